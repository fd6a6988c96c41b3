from rest_framework.routers import DefaultRouter

from . import alerts, views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("hosts", views.HostViewSet, basename="host")
router.register("gpus", views.GpuViewSet, basename="gpu")
router.register("alert-rules", alerts.AlertRuleViewSet, basename="alertrule")
router.register("alerts", alerts.AlertViewSet, basename="alert")

urlpatterns = router.urls
