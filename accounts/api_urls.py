from rest_framework.routers import DefaultRouter

from . import api_views

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("tokens", api_views.ApiTokenViewSet, basename="apitoken")
router.register("users", api_views.UserViewSet, basename="user")

urlpatterns = router.urls
