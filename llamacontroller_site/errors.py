"""Error pages. Under /api/ a URL that matches no route answers JSON like every other API error (an id of the
wrong shape, such as /api/v1/gpus/1.5/, matches no route), not the HTML page."""

from django.http import JsonResponse
from django.views import defaults


def page_not_found(request, exception):
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Not found."}, status=404)
    return defaults.page_not_found(request, exception)
