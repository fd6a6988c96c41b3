"""The instance log page, the audit trail page and /favicon.ico (GET only, database reads only)."""

from urllib.parse import urlencode

from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.templatetags.static import static
from django.views.decorators.http import require_GET

from accounts import roles
from accounts.decorators import role_required
from models_app.api.views import MAX_ID, instance_queryset
from models_app.logtail import read_tail
from models_app.models import InstanceEvent
from utilities.query import BadParameter, whole_number

from .dashboard import FAST_REFRESH_SECONDS


@require_GET
@role_required(roles.can_read)
def instance_log(request, pk: int):
    instance = get_object_or_404(instance_queryset(), pk=pk)
    text, problem = read_tail(instance.log_path)
    context = {
        "instance": instance,
        "log": text,
        "problem": problem,
        "refresh_seconds": FAST_REFRESH_SECONDS if instance.is_active else 30,
    }
    template = "partials/log_tail.html" if request.htmx and not request.htmx.boosted else "instance_log.html"
    return render(request, template, context)


EVENTS_PER_PAGE = 50


@require_GET
@role_required(roles.can_administer)
def events(request):
    """The audit trail for admins, filterable by instance, user and kind."""
    queryset = InstanceEvent.objects.select_related("instance")
    filters = {
        "instance": request.GET.get("instance", "").strip(),
        "user": request.GET.get("user", "").strip(),
        "kind": request.GET.get("kind", "").strip(),
    }
    status = 200
    if filters["instance"]:
        # ASCII digits only: "²".isdigit() is true but int("²") raises, and int("١٠") is 10.
        try:
            queryset = queryset.filter(instance_id=whole_number(filters["instance"], "instance", 1, MAX_ID))
        except BadParameter as exc:
            messages.error(request, f"Instance {exc.message}.")
            queryset, status = queryset.none(), 400
    if filters["user"]:
        queryset = queryset.filter(actor_name=filters["user"])
    if filters["kind"]:
        queryset = queryset.filter(kind=filters["kind"])
    page = Paginator(queryset, EVENTS_PER_PAGE).get_page(request.GET.get("page"))
    query = urlencode({k: v for k, v in filters.items() if v})
    context = {"page": page, "filters": filters, "kinds": InstanceEvent.Kind.choices, "query": query}
    return render(request, "events.html", context, status=status)


@require_GET
def favicon(request):
    """Browsers ask for /favicon.ico whatever the page's <link rel="icon"> says."""
    return redirect(static("favicon.svg"), permanent=True)
