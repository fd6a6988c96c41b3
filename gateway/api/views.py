from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, viewsets
from rest_framework.exceptions import ValidationError

from accounts.permissions import IsViewer
from models_app.api.views import filter_by_time

from ..usage import visible_to
from .serializers import UsageRecordSerializer


@extend_schema(
    parameters=[
        OpenApiParameter("user", str, description="Username (admins; others see only their own records)."),
        OpenApiParameter("model", str, description="Model id (without :latest)."),
        OpenApiParameter("endpoint", str, description='e.g. "/api/chat" or "/v1/chat/completions".'),
        OpenApiParameter("status", {"type": "integer", "minimum": 100, "maximum": 599}),
        OpenApiParameter("since", OpenApiTypes.DATETIME),
        OpenApiParameter("until", OpenApiTypes.DATETIME),
    ]
)
class UsageViewSet(mixins.ListModelMixin, viewsets.GenericViewSet):
    """Gateway requests, newest first: who used which model, the tokens and the time it took. Admins see
    everyone's; other roles their own."""

    serializer_class = UsageRecordSerializer
    permission_classes = [IsViewer]

    def get_queryset(self):
        if getattr(self, "swagger_fake_view", False):
            from ..models import UsageRecord

            return UsageRecord.objects.none()
        records = visible_to(self.request.user).select_related("user", "token")
        params = self.request.query_params
        errors = {}
        if params.get("user"):
            records = records.filter(user__username=params["user"])
        if params.get("model"):
            records = records.filter(model_id=params["model"].removesuffix(":latest"))
        if params.get("endpoint"):
            records = records.filter(endpoint=params["endpoint"])
        if params.get("status"):
            text = params["status"]
            if text.isascii() and text.isdigit() and 100 <= int(text) <= 599:
                records = records.filter(status=int(text))
            else:
                errors["status"] = ["must be an HTTP status between 100 and 599"]
        records = filter_by_time(records, params, errors)
        if errors:
            raise ValidationError(errors)
        return records.order_by("-created_at", "-id")
