"""Two protections for the whole site, in one middleware (settings.MIDDLEWARE):

- A NUL character in the URL's path, a query parameter or a form field answers 400 before any view runs.
  PostgreSQL refuses NUL in text, so every view that looked such a value up was a 500 there (`/events/?user=%00`,
  `POST /load/` with `model_id=x%00`, `/api/v1/models/x%00/`), while SQLite answered. Under /api/ the answer is
  JSON in the REST API's shape (`{"<parameter>": ["must not contain NUL characters"]}`), elsewhere a short
  text. JSON bodies are left to their readers: DRF's fields refuse NUL and lone surrogates, and the gateway
  checks the model name, the one string of its body that reaches the database (gateway/errors.py). The
  gateway's own routes do not pass here under ASGI (gateway/handler.py), so they are skipped here too.
- A `PermissionDenied` (a page the user's role does not open) answers Django's 403 without the traceback
  that Django logs with it at WARNING: a user without a role could fill the logs. Django still logs the
  403 in one line ("Forbidden: /events/").

Non-ASCII digits are the views' business (utilities.query), since only they know which parameter
is a number."""

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.core.exceptions import PermissionDenied
from django.core.handlers.exception import get_exception_response
from django.http import HttpResponse, JsonResponse
from django.urls import get_resolver, get_urlconf

from gateway.handler import PATHS as GATEWAY_PATHS
from utilities.query import NUL_MESSAGE


def _with_nul(params) -> list[str]:
    return sorted({name for name, values in params.lists() if "\x00" in name + "".join(values)})


def refusal(request) -> HttpResponse | None:
    """The 400 for a request that carries a NUL character where a view could read it, or None."""
    api = request.path.startswith("/api/")
    if "\x00" in request.path:
        if api:
            return JsonResponse({"detail": f"the URL path {NUL_MESSAGE}"}, status=400)
        return _text(f"The address {NUL_MESSAGE}.")
    bad = _with_nul(request.GET)
    if not bad and not api and request.method == "POST":
        bad = _with_nul(request.POST)
    if not bad:
        return None
    if api:
        return JsonResponse({name: [NUL_MESSAGE] for name in bad}, status=400)
    names = ", ".join(ascii(name) for name in bad)
    return _text(f"Bad request: {names} {NUL_MESSAGE}.")


def _text(message: str) -> HttpResponse:
    return HttpResponse(message, status=400, content_type="text/plain; charset=utf-8")


class InputGuardMiddleware:
    sync_capable = True
    async_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self.is_async = iscoroutinefunction(get_response)
        if self.is_async:
            markcoroutinefunction(self)

    def __call__(self, request):
        if self.is_async:
            return self._acall(request)
        if request.path in GATEWAY_PATHS:
            return self.get_response(request)
        return refusal(request) or self.get_response(request)

    async def _acall(self, request):
        if request.path in GATEWAY_PATHS:
            return await self.get_response(request)
        return refusal(request) or await self.get_response(request)

    def process_exception(self, request, exception):
        if isinstance(exception, PermissionDenied):
            return get_exception_response(request, get_resolver(get_urlconf()), 403, exception)
        return None
