from django.db.models import Count, Q
from drf_spectacular.utils import OpenApiParameter, extend_schema
from rest_framework import viewsets
from rest_framework.exceptions import ValidationError

from accounts.permissions import IsViewer
from gpus.models import Gpu, Host, alive_cutoff

from .serializers import GpuSerializer, HostSerializer


@extend_schema(parameters=[OpenApiParameter("state", str, enum=["up", "down"])])
class HostViewSet(viewsets.ReadOnlyModelViewSet):
    """GPU hosts with their state (up, or down with the reason), the worker that holds each name, its last
    heartbeat and address, and how many GPUs it has. Filter: `?state=up` or `?state=down`."""

    serializer_class = HostSerializer
    permission_classes = [IsViewer]

    def get_queryset(self):
        # The GPU count in the same query as the hosts.
        queryset = Host.objects.annotate(gpu_count=Count("gpus", filter=Q(gpus__index__isnull=False)))
        state = self.request.query_params.get("state")
        if state == "up":
            queryset = queryset.up()
        elif state == "down":
            # As `state` says down: not heard from within the timeout, or never (Host.objects.down() gives
            # a host that has never been heard from its first timeout).
            queryset = queryset.filter(Q(last_seen__lt=alive_cutoff()) | Q(last_seen=None))
        elif state:
            raise ValidationError({"state": ["must be up or down"]})
        return queryset.order_by("name")


class GpuViewSet(viewsets.ReadOnlyModelViewSet):
    """GPUs of every host, with the latest telemetry copied onto each row (no history scan).
    Filters: `?host=<name>`, `?state=idle`."""

    serializer_class = GpuSerializer
    permission_classes = [IsViewer]

    def get_queryset(self):
        queryset = Gpu.objects.select_related("host")
        params = self.request.query_params
        if params.get("host"):
            queryset = queryset.filter(host__name=params["host"])
        if params.get("state"):
            queryset = queryset.filter(state__in=params["state"].split(","))
        return queryset
