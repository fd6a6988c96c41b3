import re
from datetime import UTC, datetime

from django.db.models import Prefetch, ProtectedError
from django.shortcuts import get_object_or_404
from django.utils import timezone
from django.utils.dateparse import parse_datetime
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema, inline_serializer
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts import roles
from accounts.permissions import IsAdminRole, IsOperator, IsViewer, ReadViewerWriteAdmin
from gpus.models import Gpu
from models_app import admission, health, services
from models_app.events import record
from models_app.logtail import read_tail
from models_app.models import GpuInstance, HostModelFile, InstanceEvent, ModelConfig
from utilities.query import BadParameter, whole_number

from .errors import RefusalMixin, refusals
from .estimate import EstimateActions
from .serializers import (
    EventSerializer,
    InstanceSerializer,
    LoadSerializer,
    ModelConfigSerializer,
    SwitchSerializer,
)


def instance_queryset():
    """The one base queryset of instances: everything a card or a serializer reads, in one query."""
    return GpuInstance.objects.select_related("model", "host", "owner")


def check_may_manage(user, instance) -> None:
    if not roles.can_manage_instance(user, instance):
        raise PermissionDenied("Operators may unload or switch only their own instances; admins any.")


class InstanceViewSet(
    RefusalMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet
):
    """llama-server instances. Create loads a model (202: it starts in the background); unload and switch
    are actions on an instance. Filters: `?status=running,starting`, `?active=true`, `?host=<name>`."""

    serializer_class = InstanceSerializer

    def get_permissions(self):
        if self.action in ("create", "unload", "switch"):
            return [IsOperator()]
        return [IsViewer()]

    def get_queryset(self):
        queryset = instance_queryset().order_by("-requested_at", "-id")
        params = self.request.query_params
        if params.get("status"):
            queryset = queryset.filter(status__in=params["status"].split(","))
        if params.get("active", "").lower() in ("1", "true", "yes"):
            queryset = queryset.filter(status__in=GpuInstance.ACTIVE_STATUSES)
        if params.get("host"):
            queryset = queryset.filter(host__name=params["host"])
        return queryset

    @extend_schema(request=LoadSerializer, responses={202: InstanceSerializer, **refusals(409, 503)})
    def create(self, request):
        """Load `model_id` on GPUs `gpu_id` ("0" or "0,1"); without `gpu_id` the controller chooses the host
        and GPUs. 400 bad input, 409 busy GPU, nothing fits or no model file on the host, 503 broker down."""
        form = LoadSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        data = form.validated_data
        common = {
            "model_id": data["model_id"],
            "actor": request.user,
            "host_name": data.get("host"),
            "force": data.get("force", False),
            "evict": data.get("evict", False),
        }
        if data.get("gpu_id", services.AUTO).strip().lower() == services.AUTO:
            instance = services.request_load_auto(**common)
        else:
            instance = services.request_load(gpu_spec=data["gpu_id"], **common)
        return Response(self._fresh(instance), status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses={202: InstanceSerializer, **refusals(400, 409, 503)})
    @action(detail=True, methods=["post"])
    def unload(self, request, pk=None):
        instance = self.get_object()
        check_may_manage(request.user, instance)
        instance = services.request_unload(instance=instance, actor=request.user)
        return Response(self._fresh(instance), status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=SwitchSerializer, responses={202: InstanceSerializer, **refusals(409, 503)})
    @action(detail=True, methods=["post"])
    def switch(self, request, pk=None):
        """Unload this instance and load `model_id` on the same GPUs; answers the new instance."""
        instance = self.get_object()
        check_may_manage(request.user, instance)
        form = SwitchSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        new = services.request_switch(
            model_id=form.validated_data["model_id"],
            gpu_spec=instance.gpu_ids,
            actor=request.user,
            host_name=instance.host.name,
            force=form.validated_data.get("force", False),
        )
        return Response(self._fresh(new), status=status.HTTP_202_ACCEPTED)

    @extend_schema(
        parameters=[OpenApiParameter("bytes", int, description="At most this many bytes, 1 to 1048576 (default 65536).")],
        responses=inline_serializer("LogTail", {"id": serializers.IntegerField(), "log": serializers.CharField(),
                                                "problem": serializers.CharField(allow_null=True)}),
    )  # fmt: skip
    @action(detail=True, methods=["get"])
    def log(self, request, pk=None):
        """The tail of the instance's llama-server log."""
        instance = self.get_object()
        try:  # ASCII digits only: int() reads "١٠٠" as 100
            max_bytes = whole_number(request.query_params.get("bytes", "65536"), "bytes", 1, 1024 * 1024)
        except BadParameter as exc:
            raise ValidationError({"bytes": [exc.message]}) from None
        text, problem = read_tail(instance.log_path, max_bytes)
        return Response({"id": instance.pk, "log": text, "problem": problem})

    def _fresh(self, instance):
        return InstanceSerializer(instance_queryset().get(pk=instance.pk)).data


class ModelConfigViewSet(RefusalMixin, EstimateActions, viewsets.ModelViewSet):
    """The model registry: everyone with a role reads it; admins create, change and delete entries. Its
    `estimate` and `placement` actions predict a load's memory and rank the GPUs for it."""

    serializer_class = ModelConfigSerializer
    permission_classes = [ReadViewerWriteAdmin]
    # Each model's per-host file reports in one more query, whatever the number of models and hosts.
    queryset = ModelConfig.objects.prefetch_related(
        Prefetch("host_files", queryset=HostModelFile.objects.select_related("host"))
    )
    lookup_value_regex = "[-a-zA-Z0-9_]+"

    def perform_create(self, serializer):
        model = serializer.save()
        record(InstanceEvent.Kind.REGISTRY_CHANGED, actor=self.request.user, detail=f"added {model.pk}")

    def perform_update(self, serializer):
        model = serializer.save()
        record(InstanceEvent.Kind.REGISTRY_CHANGED, actor=self.request.user, detail=f"changed {model.pk}")

    @extend_schema(responses={204: None, **refusals(409)})
    def destroy(self, request, *args, **kwargs):
        model = self.get_object()
        try:
            model.delete()
        except ProtectedError:
            return Response(
                {"detail": f"Model {model.pk} has instances (past or present); it cannot be deleted."},
                status=status.HTTP_409_CONFLICT,
            )
        record(InstanceEvent.Kind.REGISTRY_CHANGED, actor=request.user, detail=f"deleted {model.pk}")
        return Response(status=status.HTTP_204_NO_CONTENT)


_ID = re.compile(r"[0-9]{1,19}", re.ASCII)
MAX_ID = 2**63 - 1  # BigAutoField


def parse_moment(text: str) -> datetime | None:
    """An ISO 8601 date and time (naive: the server's time zone) in UTC, or None when the text is not one,
    names a day or hour that does not exist (2025-13-45), or lies outside years 1 to 9999 once in UTC.
    In UTC: PostgreSQL refuses offsets past 15:59 that Python accepts (-20:33)."""
    try:
        moment = parse_datetime(text)
        if moment is None:
            return None
        if timezone.is_naive(moment):
            moment = timezone.make_aware(moment)
        return moment.astimezone(UTC)
    except (ValueError, OverflowError):
        return None


def filter_by_time(queryset, params, errors: dict, field: str = "created_at"):
    """The `since` (inclusive) and `until` (exclusive) query parameters applied to `field`; a bad value is
    put in `errors` under its parameter's name."""
    for name, lookup in (("since", f"{field}__gte"), ("until", f"{field}__lt")):
        if params.get(name):
            moment = parse_moment(params[name])
            if moment is None:
                errors[name] = [
                    "must be an ISO 8601 date and time within years 1 to 9999, e.g. 2025-01-31T12:00:00Z"
                ]
            else:
                queryset = queryset.filter(**{lookup: moment})
    return queryset


@extend_schema(
    parameters=[
        OpenApiParameter(
            "instance", {"type": "integer", "minimum": 1, "maximum": MAX_ID}, description="Instance id."
        ),
        OpenApiParameter("user", str, description="Username of the actor."),
        OpenApiParameter("kind", str),
        OpenApiParameter("since", OpenApiTypes.DATETIME),
        OpenApiParameter("until", OpenApiTypes.DATETIME),
    ]
)
class EventViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """The audit trail, newest first. Admins see every event; other roles see the instance timelines
    (logins and token changes are admin-only)."""

    serializer_class = EventSerializer
    permission_classes = [IsViewer]

    def get_queryset(self):
        queryset = InstanceEvent.objects.all()
        if not roles.can_administer(self.request.user):
            queryset = queryset.filter(instance__isnull=False)
        params = self.request.query_params
        errors = {}
        if params.get("instance"):
            # ASCII digits only ("²".isdigit() is true), and no longer than the largest id.
            if _ID.fullmatch(params["instance"]) and int(params["instance"]) <= MAX_ID:
                queryset = queryset.filter(instance_id=int(params["instance"]))
            else:
                errors["instance"] = ["must be an instance id"]
        if params.get("user"):
            queryset = queryset.filter(actor_name=params["user"])
        if params.get("kind"):
            queryset = queryset.filter(kind__in=params["kind"].split(","))
        queryset = filter_by_time(queryset, params, errors)
        if errors:
            raise ValidationError(errors)
        return queryset


class HealthView(APIView):
    """Database, broker and worker status; 503 when any of them is down."""

    permission_classes = [IsViewer]

    @extend_schema(responses={200: OpenApiTypes.OBJECT, 503: OpenApiTypes.OBJECT})
    def get(self, request):
        # The checks of /healthz with their details: API users are the team, not strangers.
        body = health.overall()
        return Response(body, status=200 if body["status"] == "ok" else 503)


class GpuClaimsView(APIView):
    """Each GPU's memory as admission counts it (models_app/claims.py): total, foreign (other processes and
    memory no instance explains), claimed and free MiB, and the instances holding it, each with its claim,
    estimate and own measured memory. Here and not in the GPU API: the gpus app does not know instances."""

    permission_classes = [IsViewer]

    @extend_schema(
        responses={
            200: inline_serializer(
                "GpuClaims",
                {
                    "gpu": serializers.IntegerField(),
                    "host": serializers.CharField(),
                    "index": serializers.IntegerField(),
                    "total_mib": serializers.IntegerField(),
                    "memory_known": serializers.BooleanField(),
                    "foreign_mib": serializers.IntegerField(),
                    "claimed_mib": serializers.IntegerField(),
                    "free_mib": serializers.IntegerField(allow_null=True),
                    "instances": serializers.ListField(child=serializers.DictField()),
                },
                many=True,
            )
        }
    )
    def get(self, request):
        gpus = list(Gpu.objects.select_related("host").exclude(index=None).order_by("host__name", "index"))
        return Response(admission.report(gpus))


class OrphanKillView(RefusalMixin, APIView):
    """Kill an orphan llama-server on this GPU (admins): one the GPU's latest telemetry lists as an orphan
    (running one of the host's llama-server binaries, owned by no instance); 404 when it lists no such pid,
    409 when it lists it as something else. 202: the host's worker checks all of it again (and that the pid
    is still the same process), then kills its process group."""

    permission_classes = [IsAdminRole]

    @extend_schema(
        request=None,
        responses={
            202: inline_serializer("OrphanKill", {"detail": serializers.CharField()}),
            **refusals(400, 404, 409, 503),
        },
    )
    def post(self, request, gpu_pk: int, pid: int):
        gpu = get_object_or_404(Gpu.objects.select_related("host"), pk=gpu_pk)
        services.kill_orphan(gpu=gpu, pid=pid, actor=request.user)
        return Response(
            {"detail": f"killing orphan process {pid} on {gpu.host.name} GPU {gpu.index}"},
            status=status.HTTP_202_ACCEPTED,
        )
