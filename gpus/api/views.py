from rest_framework import viewsets

from accounts.permissions import IsViewer
from gpus.models import Gpu

from .serializers import GpuSerializer


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
