from django.urls import path
from rest_framework.routers import DefaultRouter

from . import views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("quotas", views.QuotaViewSet, basename="quota")
router.register("reservations", views.ReservationViewSet, basename="reservation")
router.register("pins", views.PinViewSet, basename="pin")

urlpatterns = [
    path("quota/", views.QuotaUsageView.as_view(), name="quota-usage"),
    *router.urls,
]
