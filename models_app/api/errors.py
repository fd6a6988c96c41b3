"""The API's one translation of a refused request (models_app.errors.Refused): its status (the code's,
errors.STATUS) and a body. The web views answer the same status with the message."""

from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers, status
from rest_framework.response import Response

from models_app.errors import STATUS, Refused


class RefusalSerializer(serializers.Serializer):
    """For the schema: what a refusal answers (`refusal_body`)."""

    detail = serializers.CharField()
    code = serializers.ChoiceField(choices=sorted(STATUS), required=False)
    reason = serializers.CharField(
        required=False,
        help_text="Which rule decided, where one did (quota_gpu_memory, no_evictable_model, …).",
    )


def refusals(*statuses: int) -> dict:
    """`extend_schema(responses=...)` entries for the refusals an operation may answer (400, 409, 503)."""
    descriptions = {
        status.HTTP_400_BAD_REQUEST: "Refused: the request does not apply (the reason is in `detail`).",
        status.HTTP_404_NOT_FOUND: "Not found (the reason is in `detail`).",
        status.HTTP_409_CONFLICT: "Refused: the GPU or object is busy (the reason is in `detail`).",
        status.HTTP_503_SERVICE_UNAVAILABLE: "The task queue (Redis) is unreachable.",
    }
    return {code: OpenApiResponse(RefusalSerializer, description=descriptions[code]) for code in statuses}


def refusal_body(exc: Refused) -> dict:
    """`{"detail", "code"}`, plus `{<field>: [reason]}` like a DRF validation error when a field is named."""
    body = {"detail": exc.message, "code": exc.code}
    if exc.reason:
        body["reason"] = exc.reason
    if getattr(exc, "field", None):
        body[exc.field] = [exc.message]
    return body


class RefusalMixin:
    """For API views: a Refused raised anywhere in the view answers with its code's status."""

    def handle_exception(self, exc):
        if isinstance(exc, Refused):
            return Response(refusal_body(exc), status=exc.status)
        return super().handle_exception(exc)
