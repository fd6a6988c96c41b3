"""The one place where a refused request (services.LoadRefused) becomes an HTTP status and a body, for the
API and the web views alike."""

from drf_spectacular.utils import OpenApiResponse
from rest_framework import serializers, status
from rest_framework.response import Response

from models_app.services import LoadRefused

STATUS_BY_CODE = {
    "invalid": status.HTTP_400_BAD_REQUEST,
    "forbidden": status.HTTP_403_FORBIDDEN,
    "not_found": status.HTTP_404_NOT_FOUND,
    "busy": status.HTTP_409_CONFLICT,
    "unavailable": status.HTTP_503_SERVICE_UNAVAILABLE,
}


class RefusalSerializer(serializers.Serializer):
    """For the schema: what a refusal answers (`refusal_body`)."""

    detail = serializers.CharField()
    code = serializers.ChoiceField(choices=sorted(STATUS_BY_CODE), required=False)


def refusals(*statuses: int) -> dict:
    """`extend_schema(responses=...)` entries for the refusals an operation may answer (400, 409, 503)."""
    descriptions = {
        status.HTTP_400_BAD_REQUEST: "Refused: the request does not apply (the reason is in `detail`).",
        status.HTTP_404_NOT_FOUND: "Not found (the reason is in `detail`).",
        status.HTTP_409_CONFLICT: "Refused: the GPU or object is busy (the reason is in `detail`).",
        status.HTTP_503_SERVICE_UNAVAILABLE: "The task queue (Redis) is unreachable.",
    }
    return {code: OpenApiResponse(RefusalSerializer, description=descriptions[code]) for code in statuses}


def refusal_status(exc: LoadRefused) -> int:
    return STATUS_BY_CODE.get(exc.code, status.HTTP_400_BAD_REQUEST)


def refusal_body(exc: LoadRefused) -> dict:
    """`{"detail", "code"}`, plus `{<field>: [reason]}` like a DRF validation error when a field is named."""
    body = {"detail": exc.message, "code": exc.code}
    if getattr(exc, "field", None):
        body[exc.field] = [exc.message]
    return body


class RefusalMixin:
    """For API views: a LoadRefused raised anywhere in the view answers with its mapped status."""

    def handle_exception(self, exc):
        if isinstance(exc, LoadRefused):
            return Response(refusal_body(exc), status=refusal_status(exc))
        return super().handle_exception(exc)
