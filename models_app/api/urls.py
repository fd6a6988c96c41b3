from django.urls import path
from rest_framework.routers import DefaultRouter

from . import compat, history, views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("models", views.ModelConfigViewSet, basename="modelconfig")
router.register("instances", views.InstanceViewSet, basename="instance")
router.register("events", views.EventViewSet, basename="event")

# The original LlamaController's paths come first, so that `models/status` is never read as a model id.
urlpatterns = [
    path("gpu/status", compat.GpuStatusView.as_view(), name="compat-gpu-status"),
    path("models/status", compat.ModelsStatusView.as_view(), name="compat-models-status"),
    path("models/load", compat.ModelsLoadView.as_view(), name="compat-models-load"),
    path("models/unload", compat.ModelsUnloadView.as_view(), name="compat-models-unload"),
    path("health/", views.HealthView.as_view(), name="api-health"),
    path("gpu-claims/", views.GpuClaimsView.as_view(), name="gpu-claims"),
    path("gpus/<int:gpu_pk>/orphans/<int:pid>/kill/", views.OrphanKillView.as_view(), name="orphan-kill-api"),
    path("gpus/<int:pk>/history/", history.GpuHistoryView.as_view(), name="gpu-history"),
    path("instances/<int:pk>/history/", history.InstanceHistoryView.as_view(), name="instance-history"),
    *router.urls,
]
