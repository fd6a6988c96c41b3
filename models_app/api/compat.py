"""The original LlamaController's management API, for existing scripts (see docs/api-compat.md):
GET gpu/status, GET models/status, POST models/load, POST models/unload. Same shapes as the original;
loading and unloading are accepted here and finish in the background."""

from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status
from rest_framework.response import Response
from rest_framework.views import APIView

from accounts.permissions import IsOperator, IsViewer
from gpus.models import Gpu
from models_app import services
from models_app.errors import Refused
from models_app.models import GpuInstance, InstanceGpu, ModelConfig

from .errors import refusal_body
from .serializers import LoadSerializer, UnloadGpusSerializer
from .views import instance_queryset

# The original's ProcessStatus had no "pending" or "failed".
COMPAT_STATUS = {GpuInstance.Status.PENDING: "starting", GpuInstance.Status.FAILED: "error"}


def instance_status(instance: GpuInstance) -> dict:
    """One GpuInstanceStatus of the original LlamaController, plus what this controller knows besides."""
    return {
        "gpu_id": instance.gpu_ids,
        "port": instance.port,
        "model_id": instance.model_id,
        "model_name": instance.model.name,
        "status": COMPAT_STATUS.get(instance.status, instance.status),
        "loaded_at": instance.loaded_at,
        "uptime_seconds": instance.uptime_seconds,
        "pid": instance.pid,
        "memory_used_mb": instance.memory_used_mb if instance.memory_percent is not None else None,
        "memory_total_mb": instance.memory_total_mb,
        "memory_source": instance.memory_source,
        "instance_id": instance.pk,
        "host": instance.host.name,
    }


class CompatStatusSchema(serializers.Serializer):
    """The original LlamaController's GpuInstanceStatus (for the schema only): an instance, or a GPU nothing holds ("stopped")."""

    gpu_id = serializers.CharField(allow_null=True)
    port = serializers.IntegerField(allow_null=True)
    model_id = serializers.CharField(allow_null=True, required=False)
    model_name = serializers.CharField(allow_null=True, required=False)
    status = serializers.CharField()
    loaded_at = serializers.DateTimeField(allow_null=True)
    uptime_seconds = serializers.IntegerField(allow_null=True)
    pid = serializers.IntegerField(allow_null=True)
    memory_used_mb = serializers.IntegerField(allow_null=True)
    memory_total_mb = serializers.IntegerField(allow_null=True)
    memory_source = serializers.CharField()
    instance_id = serializers.IntegerField(allow_null=True)
    host = serializers.CharField(allow_null=True)
    state = serializers.CharField(required=False, help_text="A free GPU's state.")


class CompatGpusSchema(serializers.Serializer):
    gpus = CompatStatusSchema(many=True)


class CompatModelStatusSchema(CompatStatusSchema):
    loaded = serializers.BooleanField()
    instances = CompatStatusSchema(many=True)


class CompatAcceptedSchema(serializers.Serializer):
    """`success` means accepted (the work finishes in the background); a refusal adds `detail`, `code` and
    `field` (the bad input) and answers 400, 403, 404, 409 or 503."""

    success = serializers.BooleanField()
    message = serializers.CharField()
    gpu_id = serializers.CharField(allow_null=True)
    model_id = serializers.CharField(allow_null=True)
    instance_id = serializers.IntegerField(required=False, help_text="load: the new instance")
    instance_ids = serializers.ListField(child=serializers.IntegerField(), required=False, help_text="unload")
    status = serializers.CharField(required=False)


COMPAT_REFUSALS = {code: CompatAcceptedSchema for code in (404, 409, 503)}


def idle_gpu_status(gpu: Gpu) -> dict:
    """A GPU that no instance holds: the whole-GPU figures (which count other people's processes)."""
    return {
        "gpu_id": str(gpu.index),
        "port": None,
        "model_id": None,
        "model_name": None,
        "status": "stopped",
        "loaded_at": None,
        "uptime_seconds": None,
        "pid": None,
        "memory_used_mb": gpu.memory_used_mib,
        "memory_total_mb": gpu.memory_total_mib,
        "memory_source": "device" if gpu.memory_used_mib is not None else "none",
        "instance_id": None,
        "host": gpu.host.name,
        "state": gpu.state,
    }


def active_instances():
    return (
        instance_queryset()
        .filter(status__in=GpuInstance.ACTIVE_STATUSES)
        .order_by("host__name", "gpu_ids", "pk")
    )


class GpuStatusView(APIView):
    permission_classes = [IsViewer]

    @extend_schema(responses=CompatGpusSchema)
    def get(self, request):
        """`{"gpus": [...]}`: one entry per active instance (its GPUs once, "0,1"), one per free GPU."""
        held = set(InstanceGpu.objects.filter(active=True).values_list("gpu_id", flat=True))
        entries = [instance_status(i) for i in active_instances()]
        gpus = Gpu.objects.select_related("host").exclude(index=None)  # a replaced GPU answers to no index
        entries += [idle_gpu_status(g) for g in gpus if g.pk not in held]
        entries.sort(key=lambda e: (e["host"], [int(x) for x in e["gpu_id"].split(",")]))
        return Response({"gpus": entries})


class ModelsStatusView(APIView):
    permission_classes = [IsViewer]

    @extend_schema(responses=CompatModelStatusSchema(many=True))
    def get(self, request):
        """One entry per registered model: its newest active instance's status, or "stopped"."""
        by_model: dict[str, list[GpuInstance]] = {}
        for instance in active_instances().order_by("-requested_at"):
            by_model.setdefault(instance.model_id, []).append(instance)
        answer = []
        for model in ModelConfig.objects.all():
            instances = by_model.get(model.pk, [])
            entry = instance_status(instances[0]) if instances else {
                "gpu_id": None, "port": None, "status": "stopped", "loaded_at": None, "uptime_seconds": None,
                "pid": None, "memory_used_mb": None, "memory_total_mb": None, "memory_source": "none",
                "instance_id": None, "host": None,
            }  # fmt: skip
            entry.update(model_id=model.pk, model_name=model.name, loaded=bool(instances))
            entry["instances"] = [instance_status(i) for i in instances]
            answer.append(entry)
        return Response(answer)


def _compat_refusal(exc, gpu_id, model_id) -> Response:
    """The original's shape, plus the REST API's `detail` and `code` and the name of the bad field."""
    body = {
        "success": False,
        "message": exc.message,
        "gpu_id": gpu_id,
        "model_id": model_id,
        "field": exc.field,
    }
    return Response({**refusal_body(exc), **body}, status=exc.status)


class CompatLoadSerializer(LoadSerializer):
    """The original LlamaController's load: GPU indexes, "0" when left out (the controller does not choose here)."""

    gpu_id = serializers.CharField(
        max_length=100, default="0", help_text='GPU indexes: "0" or "0,1"; default "0".'
    )


class ModelsLoadView(APIView):
    permission_classes = [IsOperator]

    @extend_schema(request=CompatLoadSerializer, responses={200: CompatAcceptedSchema, **COMPAT_REFUSALS})
    def post(self, request):
        """Load `model_id` on `gpu_id` (default "0"). `success` means accepted: poll gpu/status."""
        data = request.data
        if hasattr(data, "keys"):  # JSON object or form fields (a QueryDict: copy() keeps single values)
            data = data.copy()
            data.setdefault("gpu_id", "0")
        form = CompatLoadSerializer(data=data)
        form.is_valid(raise_exception=True)
        gpu_id, model_id = form.validated_data["gpu_id"], form.validated_data["model_id"]
        try:
            instance = services.request_load(
                model_id=model_id,
                gpu_spec=gpu_id,
                actor=request.user,
                host_name=form.validated_data.get("host"),
                force=form.validated_data.get("force", False),
            )
        except Refused as exc:
            return _compat_refusal(exc, gpu_id, model_id)
        message = f"Loading {model_id} on GPU {instance.gpu_ids} (instance #{instance.pk})"
        return Response(
            {"success": True, "message": message, "gpu_id": instance.gpu_ids, "model_id": model_id,
             "instance_id": instance.pk, "status": COMPAT_STATUS.get(instance.status, instance.status)},
            status=status.HTTP_200_OK,
        )  # fmt: skip


class ModelsUnloadView(APIView):
    permission_classes = [IsOperator]

    @extend_schema(request=UnloadGpusSerializer, responses={200: CompatAcceptedSchema, **COMPAT_REFUSALS})
    def post(self, request):
        """Unload whatever runs on `gpu_id`. `success` means accepted: poll gpu/status."""
        form = UnloadGpusSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        gpu_id = form.validated_data["gpu_id"]
        try:
            instances = services.request_unload_gpus(
                gpu_spec=gpu_id, actor=request.user, host_name=form.validated_data.get("host")
            )
        except Refused as exc:
            return _compat_refusal(exc, gpu_id, None)
        if instances:
            names = ", ".join(f"#{i.pk} ({i.model_id})" for i in instances)
            message = f"Unloading instance {names} on GPU {gpu_id}"
        else:
            message = f"Nothing is loaded on GPU {gpu_id}"
        return Response(
            {"success": True, "message": message, "gpu_id": gpu_id,
             "model_id": instances[0].model_id if instances else None,
             "instance_ids": [i.pk for i in instances]},
            status=status.HTTP_200_OK,
        )  # fmt: skip
