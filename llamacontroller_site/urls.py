from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

from models_app.metrics import metrics_view

from .health import healthz

api_v1 = [
    path("", include("gpus.api.urls")),
    path("", include("models_app.api.urls")),
    path("", include("accounts.api_urls")),
    path("", include("gateway.api.urls")),
    path("", include("policy.api.urls")),
]

handler404 = "llamacontroller_site.errors.page_not_found"
handler500 = "llamacontroller_site.errors.server_error"

urlpatterns = [
    path("healthz", healthz, name="healthz"),
    # Prometheus exposition (token or allowlisted address; see models_app/metrics.py).
    path("metrics", metrics_view, name="metrics"),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("accounts/", include("accounts.urls")),
    path("usage/", include("gateway.web_urls")),
    # The Ollama- and OpenAI-compatible endpoints: /api/chat, /api/tags, ..., /v1/chat/completions, ...
    path("", include("gateway.urls")),
    # Memory history pages and alerts (before the dashboard's own routes).
    path("", include("models_app.web.history_urls")),
    path("", include("models_app.web.urls")),
]
