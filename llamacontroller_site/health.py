"""GET /healthz: 200 {"status": "ok"} when database, broker and a worker answer, 503 {"status": "error"}
otherwise. Anonymous callers learn only that; logged-in staff also see each check (error texts, host
names), which would tell a stranger too much about the installation."""

from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET

from models_app.health import overall


@never_cache
@require_GET
def healthz(request):
    body = overall()
    status = 200 if body["status"] == "ok" else 503
    user = getattr(request, "user", None)
    if not (user is not None and user.is_authenticated and user.is_staff):
        body = {"status": body["status"]}
    return JsonResponse(body, status=status)
