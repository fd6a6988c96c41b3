"""`GET /api/v1/models/{id}/estimate` and `/placement`: a model's predicted memory on chosen GPUs (or the
suggestion), and the ranking of the GPU sets it may load on. Read-only: any role. They read the database and
the GGUF header (cached); nothing runs."""

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import serializers
from rest_framework.decorators import action
from rest_framework.response import Response

from models_app import checks, estimates, placement
from models_app.errors import Refused
from models_app.estimator import EstimateError

FLAG_PARAMETERS = [
    OpenApiParameter("c", int, description="Context size (-c); default the model's flags, else its trained context."),
    OpenApiParameter("ngl", int, description="Layers on the GPUs (-ngl); -1 or more than the model has: all."),
    OpenApiParameter("ctk", str, description="K cache type (-ctk): f16, q8_0, q4_0, ..."),
    OpenApiParameter("ctv", str, description="V cache type (-ctv); a quantized one needs flash attention."),
    OpenApiParameter("fa", str, description="Flash attention (-fa): on, off, auto."),
    OpenApiParameter("np", int, description="Parallel slots (-np)."),
    OpenApiParameter("b", int, description="Logical batch size (-b)."),
    OpenApiParameter("ub", int, description="Micro-batch size (-ub)."),
    OpenApiParameter("sm", str, description="Split mode (-sm): none, layer, row."),
    OpenApiParameter("ts", str, description="Tensor split (-ts), e.g. 3,1."),
    OpenApiParameter("nkvo", str, description="No KV offload (-nkvo): 1 keeps the KV cache in host memory."),
    OpenApiParameter("swa-full", str, description="Full-size sliding-window cache (--swa-full): 1 or 0."),
    OpenApiParameter("kvu", str, description="One KV cache shared by the slots (-kvu 1) or one per slot (0)."),
]  # fmt: skip


class PerGpuSerializer(serializers.Serializer):
    gpu_id = serializers.IntegerField()
    name = serializers.CharField()
    estimated_mib = serializers.IntegerField(help_text="Corrected by earlier loads where there are some.")
    formula_mib = serializers.IntegerField(help_text="The estimator's own figure.")
    free_mib = serializers.IntegerField(allow_null=True, help_text="Free before the load (null: unknown).")
    free_after_mib = serializers.IntegerField(allow_null=True)


class CorrectionSerializer(serializers.Serializer):
    factor = serializers.FloatField(help_text="Median measured/estimated of recent loads (1.0 without any).")
    loads = serializers.IntegerField(help_text="How many loads the factor comes from.")


class EstimateSerializer(serializers.Serializer):
    model = serializers.CharField()
    gpu_ids = serializers.CharField(help_text='"" for a load without GPUs (everything on the host).')
    host = serializers.CharField(allow_null=True)
    estimated_mib = serializers.IntegerField(allow_null=True, help_text="Over all its GPUs.")
    per_gpu = PerGpuSerializer(many=True)
    fits = serializers.BooleanField(allow_null=True, help_text="null: no estimate or free memory unknown.")
    correction = CorrectionSerializer()
    llama_version = serializers.CharField()
    summary = serializers.CharField(help_text='e.g. "≈ 6.1 GiB on GPU 0: fits, 74.0 GiB free".')
    context_note = serializers.CharField(
        help_text="Set when the model gives no context and llama-server's --fit will lower the trained one to fit."
    )
    breakdown = serializers.JSONField(
        allow_null=True, help_text="Per GPU and host: weights, KV, compute, overhead (MiB); the settings."
    )
    error = serializers.CharField(help_text="Why there is no estimate (the file cannot be read, ...).")


class ChoiceSerializer(serializers.Serializer):
    host = serializers.CharField()
    gpu_ids = serializers.CharField()
    fits = serializers.BooleanField(allow_null=True)
    estimated_mib = serializers.IntegerField(allow_null=True)
    spare_mib = serializers.IntegerField(allow_null=True)
    shared_with_others = serializers.BooleanField()
    explanation = serializers.CharField()
    summary = serializers.CharField()


class PlacementSerializer(serializers.Serializer):
    model = serializers.CharField()
    suggestion = ChoiceSerializer(allow_null=True, help_text="The first set that fits; null when none does.")
    ranking = ChoiceSerializer(many=True)
    unavailable = serializers.ListField(child=serializers.CharField(), help_text="GPUs left out, and why.")


def overrides_from(query, *, also: tuple[str, ...]) -> dict:
    """The flag parameters as canonical options; a bad one, or a parameter the endpoint does not know (a
    typo such as `ngll` would otherwise be estimated without it), is a 400 naming it. `also`: the endpoint's
    other parameters."""
    known = {p.name for p in FLAG_PARAMETERS} | set(also) | {"format"}
    unknown = sorted(name for name in query if name not in known)
    if unknown:
        names = ", ".join(repr(name[:40]) for name in unknown[:5])
        raise Refused(
            f"unknown parameter {names}: known are {', '.join(sorted(known))}", field=unknown[0][:40]
        )
    given = {}
    for parameter in FLAG_PARAMETERS:
        value = query.get(parameter.name)
        if value is None:
            continue
        if len(value) > 100 or "\x00" in value:
            raise Refused(f"{parameter.name}: value too long or not text", field=parameter.name)
        try:
            estimates.parse_overrides({parameter.name: value})
        except EstimateError as exc:
            raise Refused(str(exc), field=parameter.name) from None
        given[parameter.name] = value
    try:  # together: -fa off with a quantized -ctv is refused, as llama-server refuses it
        return estimates.parse_overrides(given)
    except EstimateError as exc:
        canonical = str(exc).split(":")[0]
        field = next((n for n, c in estimates.OVERRIDES.items() if c == canonical and n in given), None)
        raise Refused(str(exc), field=field) from None


def host_param(query) -> str | None:
    host = query.get("host")
    if host is not None and (not host or len(host) > 100 or "\x00" in host):
        raise Refused("host: not a host name", field="host")
    return host


class EstimateActions:
    """Mixed into ModelConfigViewSet (which adds the routes as actions)."""

    @extend_schema(
        parameters=[
            OpenApiParameter(
                "gpu_id", str, description='GPU indexes: "0" or "0,1"; default: the suggestion.'
            ),
            OpenApiParameter("host", str, description="Host name; default: the only host with those GPUs."),
            *FLAG_PARAMETERS,
        ],
        responses={200: EstimateSerializer},
    )
    @action(detail=True, methods=["get"])
    def estimate(self, request, pk=None):
        """The model's predicted memory per GPU (weights, KV cache, compute, CUDA context), corrected by what
        earlier loads on that kind of GPU measured, and whether it fits in their free memory now."""
        model = self.get_object()
        overrides = overrides_from(request.query_params, also=("gpu_id", "host"))
        host_name = host_param(request.query_params)
        spec = request.query_params.get("gpu_id")
        if spec is not None:
            _, gpus = checks.resolve_gpus(checks.parse_gpu_spec(spec), host_name)
            return Response(estimates.predict(model, gpus, overrides).as_dict())
        host = checks.host_named(host_name) if host_name is not None else None
        choices, unavailable = placement.rank(model, host=host, overrides=overrides)
        return Response(estimates.suggested(model, choices, unavailable, overrides).as_dict())

    @extend_schema(
        parameters=[OpenApiParameter("host", str, description="Only this host's GPUs."), *FLAG_PARAMETERS],
        responses={200: PlacementSerializer},
    )
    @action(detail=True, methods=["get"])
    def placement(self, request, pk=None):
        """The GPU sets of the live hosts ranked for this model: single GPUs by the memory left after the
        estimate (idle before shared with other people's processes), then the smallest set that fits, with
        the reasons; the GPUs left out (held, unavailable) and why."""
        model = self.get_object()
        overrides = overrides_from(request.query_params, also=("host",))
        host_name = host_param(request.query_params)
        host = checks.host_named(host_name) if host_name is not None else None
        choices, unavailable = placement.rank(model, host=host, overrides=overrides)
        fitting = [c for c in choices if c.fits]
        return Response(
            {
                "model": model.pk,
                "suggestion": fitting[0].as_dict() if fitting else None,
                "ranking": [c.as_dict() for c in choices],
                "unavailable": unavailable,
            }
        )
