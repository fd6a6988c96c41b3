"""Memory history of a GPU or an instance: bucketed max and mean from `gpus.history`, with the load, unload
and crash events (instance timelines, here in models_app) and the alerts marked on the time axis. Here rather
than in gpus/api because the events are models_app's: gpus never imports models_app."""

from django.db.models import Q
from django.shortcuts import get_object_or_404
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import IsViewer
from gpus import history
from gpus.models import Gpu
from models_app.models import GpuInstance, InstanceEvent, InstanceGpu

# Instance events that mark the time axis, and the word each one shows.
TIMELINE_KINDS = {
    InstanceEvent.Kind.HEALTHY: "loaded",
    InstanceEvent.Kind.ADOPTED: "adopted",
    InstanceEvent.Kind.UNLOADED: "unloaded",
    InstanceEvent.Kind.CRASHED: "crashed",
    InstanceEvent.Kind.FAILED: "failed",
    InstanceEvent.Kind.KILLED: "killed",
}


class PointSerializer(serializers.Serializer):
    t = serializers.IntegerField(help_text="Start of the bucket, epoch seconds.")
    max_mib = serializers.IntegerField(allow_null=True)
    mean_mib = serializers.FloatField(allow_null=True)
    total_mib = serializers.IntegerField(allow_null=True)


class MarkSerializer(serializers.Serializer):
    t = serializers.IntegerField(help_text="Epoch seconds.")
    at = serializers.DateTimeField()
    kind = serializers.CharField(
        help_text="loaded, unloaded, crashed, failed, killed, adopted, alert_fired, …"
    )
    text = serializers.CharField(allow_blank=True)


class HistorySerializer(serializers.Serializer):
    subject = serializers.CharField(help_text='"gpu:<id>" or "instance:<id>".')
    label = serializers.CharField()
    window = serializers.ChoiceField(choices=list(history.WINDOWS))
    resolution = serializers.IntegerField(help_text="Seconds per point.")
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    total_mib = serializers.IntegerField(allow_null=True, help_text="The GPU's (or the GPUs') memory.")
    estimate_mib = serializers.IntegerField(
        allow_null=True,
        help_text="Instances: the memory estimated when the load was asked for (weights, KV cache, compute "
        "buffers and CUDA context over its GPUs, corrected by earlier loads). Null for GPUs, or for instances "
        "loaded before estimates were stored or whose model file could not be read.",
    )
    points = PointSerializer(many=True)
    events = MarkSerializer(many=True)
    summary = serializers.DictField(child=serializers.FloatField(allow_null=True))


PARAMETERS = [
    OpenApiParameter("window", str, enum=list(history.WINDOWS), description="1h (default), 24h or 7d."),
    OpenApiParameter(
        "resolution",
        {"type": "string", "pattern": "^(auto|[0-9]{1,9})$"},
        description=f"Seconds per point, or auto (default): at most {history.MAX_POINTS} points.",
    ),
]


def span_of(request) -> history.Span:
    try:
        return history.parse_span(request.query_params.get("window"), request.query_params.get("resolution"))
    except history.HistoryError as exc:
        raise ValidationError({exc.field: [str(exc)]}) from None


def instance_marks(instance_ids, span) -> list[dict]:
    events = InstanceEvent.objects.filter(
        instance_id__in=instance_ids, kind__in=list(TIMELINE_KINDS), created_at__gte=span.start
    ).order_by("created_at")[:500]
    return [
        history.mark(e.created_at, TIMELINE_KINDS[e.kind], f"#{e.instance_id} {e.detail}"[:300])
        for e in events
    ]


def weights_estimate_mib(instance: GpuInstance) -> int | None:
    """The memory the instance was estimated to need when its load was asked for (stored on it)."""
    return instance.memory_estimated_mb


def respond(subject, label, span, total, points, marks, estimate=None) -> Response:
    marks.sort(key=lambda m: m["t"])
    body = {
        "subject": subject, "label": label, "window": span.window, "resolution": span.resolution,
        "start": span.start, "end": span.end, "total_mib": total, "estimate_mib": estimate, "points": points,
        "events": marks, "summary": history.summary(points),
    }  # fmt: skip
    return Response(HistorySerializer(body).data)


class GpuHistoryView(APIView):
    """A GPU's used memory (whole GPU) over the window, downsampled, with the loads, unloads and crashes of
    the instances it served and its alerts."""

    permission_classes = [IsViewer]

    @extend_schema(parameters=PARAMETERS, responses=HistorySerializer)
    def get(self, request, pk: int):
        gpu = get_object_or_404(Gpu.objects.select_related("host"), pk=pk)
        span = span_of(request)
        points = history.gpu_series(gpu.pk, span)
        served = InstanceGpu.objects.filter(gpu=gpu).filter(
            Q(instance__stopped_at__isnull=True) | Q(instance__stopped_at__gte=span.start)
        )
        marks = instance_marks(served.values_list("instance_id", flat=True), span)
        marks += history.alert_events(Q(gpu=gpu), span)
        label = f"{gpu.host.name} GPU {gpu.index if gpu.index is not None else '(replaced)'} · {gpu.name}"
        return respond(f"gpu:{gpu.pk}", label, span, gpu.memory_total_mib, points, marks)


class InstanceHistoryView(APIView):
    """An instance's own memory (its process tree) over the window, downsampled, with its timeline
    (loaded, unloaded, crashed) and its alerts."""

    permission_classes = [IsViewer]

    @extend_schema(parameters=PARAMETERS, responses=HistorySerializer)
    def get(self, request, pk: int):
        instance = get_object_or_404(GpuInstance.objects.select_related("model", "host"), pk=pk)
        span = span_of(request)
        points = history.instance_series(instance.pk, span)
        marks = instance_marks([instance.pk], span) + history.alert_events(Q(instance_id=instance.pk), span)
        label = f"{instance.model.name} (#{instance.pk}) on {instance.host.name} GPU {instance.gpu_ids}"
        return respond(
            f"instance:{instance.pk}", label, span, instance.memory_total_mb, points, marks,
            estimate=weights_estimate_mib(instance),
        )  # fmt: skip
