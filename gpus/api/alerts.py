"""Alert rules (admins change them, everyone with a role reads them) and alerts (read; operators and admins
acknowledge)."""

from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import mixins, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response

from accounts.permissions import IsOperator, IsViewer, ReadViewerWriteAdmin
from gpus import alerts
from gpus.models import Alert, AlertRule

from .serializers import AlertRuleSerializer, AlertSerializer


class AlertRuleViewSet(viewsets.ModelViewSet):
    """Alert rules: GPU used ≥ X % for Y minutes, instance memory growing ≥ Z MiB/h (least-squares slope over
    a window), GPU memory within M MiB of its total, telemetry failing for N minutes, a foreign process on a
    GPU that serves one of our instances, an instance crashed."""

    serializer_class = AlertRuleSerializer
    permission_classes = [ReadViewerWriteAdmin]
    queryset = AlertRule.objects.all()


@extend_schema(
    parameters=[
        OpenApiParameter("status", str, description="pending, open, resolved; several separated by commas."),
    ]
)
class AlertViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Alerts, newest first. Open ones fired once and stay open while their condition holds; they resolve
    with hysteresis. `POST /alerts/{id}/acknowledge/` (operators and admins) records who saw it."""

    serializer_class = AlertSerializer

    def get_permissions(self):
        return [IsOperator()] if self.action == "acknowledge" else [IsViewer()]

    def get_queryset(self):
        queryset = Alert.objects.select_related("rule", "host").order_by("-started_at", "-id")
        wanted = self.request.query_params.get("status")
        if wanted:
            statuses = wanted.split(",")
            if not set(statuses) <= set(Alert.Status.values):
                raise ValidationError({"status": [f"must be among {', '.join(Alert.Status.values)}"]})
            queryset = queryset.filter(status__in=statuses)
        return queryset

    @extend_schema(request=None, responses=AlertSerializer)
    @action(detail=True, methods=["post"])
    def acknowledge(self, request, pk=None):
        alert = alerts.acknowledge(self.get_object(), request.user.get_username())
        return Response(AlertSerializer(alert).data)
