"""The playground: chat with a running model in the browser, through the gateway as the logged-in user (the
gateway accepts the session, with the CSRF header on writes), streamed, with a stop button and the request's
time to first token and tokens per second (static/js/playground.js). The page itself only reads the database."""

from django.shortcuts import get_object_or_404, render
from django.views.decorators.http import require_GET

from accounts import roles
from accounts.decorators import role_required
from models_app.api.views import instance_queryset


@require_GET
@role_required(roles.can_read)
def playground(request, pk: int):
    instance = get_object_or_404(instance_queryset(), pk=pk)
    context = {"instance": instance, "gateway_base_url": request.build_absolute_uri("/")}
    return render(request, "playground.html", context)
