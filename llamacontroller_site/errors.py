"""Error pages. Under /api/ a URL that matches no route answers JSON like every other API error (an id of the
wrong shape, such as /api/v1/gpus/1.5/, matches no route), not the HTML page.

A database that cannot be reached is not a bug of ours: wherever it shows up (a view, DRF's authentication,
the session or login middleware), the answer is 503 with the reason, JSON under /api/ and /v1/ as /healthz and
the dashboard already said, instead of Django's bare "Server Error (500)"."""

import sys

from django.db import InterfaceError, OperationalError
from django.http import JsonResponse
from django.shortcuts import render
from django.views import defaults

API_PREFIXES = ("/api/", "/v1/")


def page_not_found(request, exception):
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)


def database_unavailable(exc: BaseException) -> str:
    """The reason, in one line: "the database is unavailable: connection ... refused"."""
    first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return f"the database is unavailable: {first}"


def server_error(request):
    """handler500: Django calls it inside its `except`, so the exception is at hand."""
    exc = sys.exc_info()[1]
    if isinstance(exc, OperationalError | InterfaceError):
        reason = database_unavailable(exc)
        if request.path.startswith(API_PREFIXES):
            response = JsonResponse({"detail": reason, "code": "unavailable"}, status=503)
        else:
            response = render(request, "database_down.html", {"error": reason}, status=503)
        response["Retry-After"] = "10"
        return response
    if request.path.startswith(API_PREFIXES):
        return JsonResponse({"detail": "Server error."}, status=500)
    return defaults.server_error(request)
