"""What the Ollama and OpenAI listings share: GET only, who asks, refusals in the route's dialect. (The
inference routes' protocol is protocol.py.)"""

from collections.abc import Callable

from django.http import HttpResponse, HttpResponseNotAllowed, JsonResponse

from . import access
from .db import db
from .errors import GatewayError, error_response


def listable(request) -> list:
    """The models the caller may see (on a database thread)."""
    return list(access.listable_models(access.authenticate(request)))


async def listing(request, dialect: str, fetch: Callable, shape: Callable[[list], dict]) -> HttpResponse:
    """A route that only reads: 405 but for GET; `fetch(request)` on a database thread (it authenticates:
    its refusals are answered in the route's `dialect`); the answer is `shape` of what it fetched."""
    if request.method != "GET":
        return HttpResponseNotAllowed(["GET"])
    try:
        rows = await db(fetch)(request)
    except GatewayError as exc:
        return error_response(dialect, exc)
    return JsonResponse(shape(rows))
