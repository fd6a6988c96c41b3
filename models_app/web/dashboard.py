"""The dashboard: the page, or for htmx its cards only. dashboard_context computes every value the cards show
(models_app/templatetags/dashboard_cards.py writes them), in a fixed number of queries. Reads only the database."""

import hashlib
from datetime import timedelta

from django.conf import settings
from django.core.cache import cache
from django.db import DatabaseError
from django.db.models import Prefetch
from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from accounts import roles
from accounts.decorators import role_required
from gpus.models import Gpu, Host, alive_cutoff
from models_app import health, keepalive
from models_app.api.views import instance_queryset
from models_app.formatting import format_duration
from models_app.models import GpuInstance, InstanceEvent, InstanceGpu, ModelConfig
from policy import pins, quotas, rules
from policy.models import Quota
from policy.reasons import mib

from .gpu_memory import memory_segments

Status = GpuInstance.Status
TRANSITIONS = (Status.PENDING, Status.STARTING, Status.STOPPING)
FAST_REFRESH_SECONDS = 2
BROKER_CHECK_CACHE_SECONDS = 5
LIVE_TEMPLATE = "partials/dashboard_live.html"
# The events that (re)start a stop's clock: asked for, by the idle timer, or sent again (a load's resends
# come before its unload's request, so only an unload's count while stopping).
STOP_EVENT_KINDS = (
    InstanceEvent.Kind.UNLOAD_REQUESTED,
    InstanceEvent.Kind.IDLE_UNLOAD,
    InstanceEvent.Kind.SWITCH_REQUESTED,
    InstanceEvent.Kind.RESENT,
)


def _broker_status() -> dict:
    # Full page loads only, and cached: a dead broker must not cost a timeout on every page view.
    return cache.get_or_set("dashboard:broker-check", health.check_broker, BROKER_CHECK_CACHE_SECONDS)


def _decorate_instance(instance: GpuInstance, user, now) -> None:
    """Display values for one instance card (computed here, so the template stays plain)."""
    instance.gpu_count = len(instance.links)
    instance.can_manage = roles.can_manage_instance(user, instance)
    instance.in_transition = instance.status in TRANSITIONS
    instance.uptime_display = format_duration(instance.uptime_seconds)
    # Idle unload: after how long idle, and when (no note for an instance loaded by hand that stays).
    keep_alive = keepalive.keep_alive_of(instance)
    after = None if keep_alive is None else f"unloads after {keepalive.describe_idle(keep_alive)} idle"
    if instance.loaded_on_demand:
        instance.idle_note = f"Loaded on demand, {after or 'stays loaded'}"
    else:
        instance.idle_note = after and after[0].upper() + after[1:]
    instance.expires_at = keepalive.expires_at(instance, now)
    # A down host: unload and switch are refused (409) until it answers; an unknown instance keeps the
    # figures it had when the host went quiet.
    instance.host_down = not instance.host.up
    instance.unknown_note = ""
    if instance.status == Status.UNKNOWN:
        since = instance.memory_updated_at or instance.host.last_seen
        instance.unknown_note = "unknown — host down" + (
            f", last figures from {timezone.localtime(since):%H:%M}" if since else ""
        )
    instance.elapsed_display = instance.progress = None
    if not instance.in_transition:
        return
    if instance.status == Status.STOPPING:
        since = instance.stop_events[0].created_at if instance.stop_events else None
        budget = settings.STOP_TIMEOUT
    else:
        since, budget = instance.requested_at, settings.LOAD_TIMEOUT
    if since is not None:
        elapsed = (now - since).total_seconds()
        instance.elapsed_display = format_duration(elapsed)
        # Never 100% before the worker says so: the bar shows time spent against the timeout.
        instance.progress = min(95, int(elapsed * 100 / budget))


def _policy_marks(instance: GpuInstance, borrowed: set[int], pinned_by: dict[int, str]) -> list[tuple]:
    """The card's policy badges, (kind, label, title): borrowed (beyond its owner's quota) and pinned."""
    marks = []
    if instance.pk in borrowed:
        owner = instance.owner.get_username() if instance.owner else "its owner"
        title = f"borrowed: beyond {owner}'s quota, reclaimed first when room is needed"
        marks.append(("borrowed", "borrowed", title))
    if instance.pk in pinned_by:
        title = f"pinned by {pinned_by[instance.pk]}: never unloaded automatically"
        marks.append(("pinned", "pinned", title))
    return marks


# The quota panel's rows: usage()'s key, the label, how a figure is written ("6 100 of 65 536 MiB", "2 of 4").
QUOTA_ROWS = (("gpu_memory_mib", "GPU memory", mib), ("gpus", "GPUs", str), ("models_loaded", "Models", str))


def quota_panel(user) -> dict | None:
    """The "Your quota" panel: the user's use against their limits (policy.quotas.usage); None without a quota."""
    use = quotas.usage(user)
    if use["source"] == rules.UNLIMITED.source:
        return None
    rows = []
    for key, label, write in QUOTA_ROWS:
        used, limit = use["used"][key], use["limits"][key]
        shown = (
            f"{write(used)} (no limit)" if limit is None else f"{used:,} of {write(limit)}".replace(",", " ")
        )
        rows.append({"label": label, "used": used, "limit": limit, "shown": shown})
    return {"source": use["source"], "hard": use["hard"], "rows": rows}


def _decorate_host(host: Host, cutoff, now) -> None:
    """A host header's display values: its state, the reason when down, the heartbeat's age."""
    host.up = host.last_seen is not None and host.last_seen >= cutoff
    host.shown_state = "up" if host.up else "down"  # Host.state, without a clock read per use
    host.reason = "" if host.up else host.down_reason()
    host.heartbeat_display = (
        f"{format_duration((now - host.last_seen).total_seconds())} ago" if host.last_seen else "never"
    )
    host.gpu_list = []


GPU_STATES = dict(Gpu.State.choices)


def _toggle_title(gpu: Gpu) -> str:
    """The load form's hint on a GPU: why it cannot be chosen, or that it is free."""
    if not gpu.host.up:
        return gpu.host.reason
    if gpu.state == Gpu.State.OCCUPIED_BY_OTHERS:
        return gpu.state_reason
    if gpu.selectable and gpu.holders:
        return "Shared with " + ", ".join(i.model.name for i in gpu.holders) + ": a model joins where it fits"
    if gpu.selectable:
        return "Free"
    label = GPU_STATES.get(gpu.state, gpu.state)
    return f"{label}: {gpu.holder.model.name}" if gpu.holder else label


def _decorate_gpu(gpu: Gpu, names: dict[int, str]) -> None:
    """A GPU card's display values: its state as people should read it, its memory bar, the load form's toggle."""
    gpu.other_processes = [p for p in gpu.processes or [] if p.get("owner") != "instance"]
    # Occupied by others: selectable, but the load needs "force" (the server checks it). A down host's
    # GPUs are not, even before the host check has marked them unavailable. "Model loaded" with no active
    # instance is the telemetry not caught up with an unload yet: free, as the server and the suggestion see it.
    # With sharing on, a GPU that holds models is offered too: admission decides by memory, and the estimate
    # under the form says whether the model fits beside them.
    free_or_shared = gpu.holder is None or settings.GPU_SHARING
    gpu.selectable = gpu.host.up and free_or_shared and gpu.state != Gpu.State.UNAVAILABLE
    gpu.toggle_title = _toggle_title(gpu)
    # The telemetry says "idle" until the next sample; a model starting or stopping on it says more.
    moving = next((i for i in gpu.holders if i.in_transition), None)
    if moving is not None:
        gpu.shown_state, gpu.shown_label = moving.status, GpuInstance.Status(moving.status).label
    else:
        gpu.shown_state, gpu.shown_label = gpu.state, GPU_STATES.get(gpu.state, gpu.state)
    gpu.segments = memory_segments(gpu, names)


def _form_signature(gpus, models) -> str:
    """What the load form offers (its GPU toggles and models): when the live cards carry another signature, the
    page fetches a new form (static/js/app.js)."""
    offered = [(g.pk, g.selectable, g.toggle_title) for g in gpus] + [m.pk for m in models]
    return hashlib.sha1(repr(offered).encode(), usedforsecurity=False).hexdigest()[:12]


def _shared_host(by_id: dict, row, cutoff, now) -> Host:
    """The one decorated object of a GPU's or an instance's host (one created after the hosts were read is
    fetched and added)."""
    if row.host_id not in by_id:
        _decorate_host(row.host, cutoff, now)
        by_id[row.host_id] = row.host
    return by_id[row.host_id]


def dashboard_context(user, base_url: str = "/") -> dict:
    """Everything the cards show, in a fixed number of queries whatever the number of hosts/GPUs/instances.
    `base_url`: the site's address as the browser reached it, for the cards' "use it through the gateway"
    lines (a loaded model is used through the gateway, never at its internal port)."""
    now = timezone.now()
    cutoff = alive_cutoff()
    hosts = list(Host.objects.all())
    by_id = {host.pk: host for host in hosts}
    for host in hosts:
        _decorate_host(host, cutoff, now)
    # Each GPU and instance shares its host's object (one state, no query); the instances' GPU links share
    # these GPU objects too (replaced GPUs included: they still have their instances).
    all_gpus = list(Gpu.objects.order_by("host__name", "index"))
    gpu_by_id = {gpu.pk: gpu for gpu in all_gpus}
    gpus = [gpu for gpu in all_gpus if gpu.index is not None]  # replaced GPUs: admin and API only
    instances = list(
        instance_queryset()
        .filter(status__in=GpuInstance.ACTIVE_STATUSES)
        .order_by("host__name", "requested_at")
        .prefetch_related(
            # A list (to_attr): the manager's per-instance queryset clone costs more than the rows.
            Prefetch("gpu_links", queryset=InstanceGpu.objects.all(), to_attr="links"),
            Prefetch(
                "events",
                queryset=InstanceEvent.objects.filter(kind__in=STOP_EVENT_KINDS).order_by("-created_at"),
                to_attr="stop_events",
            ),
        )
    )
    # Instances that ended badly in the last hour stay visible, with their error, until someone looks.
    failures = list(
        instance_queryset()
        .filter(status__in=[Status.CRASHED, Status.FAILED], stopped_at__gte=now - timedelta(hours=1))
        .order_by("-stopped_at")[:5]
    )
    # Idle unloads of the last hour, so that a model that went away says why.
    idle_unloads = list(
        InstanceEvent.objects.filter(
            kind=InstanceEvent.Kind.IDLE_UNLOAD,
            created_at__gte=now - timedelta(hours=1),
        )
        .select_related("instance__model")
        .order_by("-created_at")[:5]
    )
    # The policy's marks, read once for every card (a fixed number of queries; one while nobody has a quota).
    any_quota = Quota.objects.exists()
    borrowed = quotas.borrowed_instance_ids() if any_quota else set()
    pinned_by = pins.pinned_by_names()
    holders: dict[int, list[GpuInstance]] = {}
    for instance in instances:
        instance.host = _shared_host(by_id, instance, cutoff, now)
        _decorate_instance(instance, user, now)
        instance.policy_marks = _policy_marks(instance, borrowed, pinned_by)
        for link in instance.links:
            if link.gpu_id in gpu_by_id:  # else a GPU newer than the read above: fetched on use (rare)
                link.gpu = gpu_by_id[link.gpu_id]
            holders.setdefault(link.gpu_id, []).append(instance)
    # Model cards in GPU order: host, then the first GPU each one uses.
    instances.sort(key=lambda i: (i.host.name, min((link.gpu.index or 0 for link in i.links), default=0)))
    names = {instance.pk: instance.model.name for instance in instances}
    for gpu in gpus:
        gpu.host = _shared_host(by_id, gpu, cutoff, now)
        gpu.host.gpu_list.append(gpu)
        gpu.holders = holders.get(gpu.pk, [])
        gpu.holder = gpu.holders[0] if gpu.holders else None
        _decorate_gpu(gpu, names)
    transitioning = any(i.in_transition for i in instances)
    models = list(ModelConfig.objects.only("id", "name")) if roles.can_load(user) else []
    # A host whose llama-server is missing, or whose GPU query fails, says so on top of the page.
    host_problems = [h for h in hosts if h.llama_server_error or h.telemetry_error]
    return {
        "host_problems": host_problems,
        # Hosts with GPUs, and up hosts without (a worker that has not reported any yet).
        "hosts": [h for h in hosts if h.gpu_list or h.up],
        "gpus": gpus,
        "instances": instances,
        "failures": failures,
        "idle_unloads": idle_unloads,
        "models": models,
        "form_signature": _form_signature(gpus, models),
        "multi_host": len({g.host_id for g in gpus}) > 1,
        "any_occupied": any(g.selectable and g.state == Gpu.State.OCCUPIED_BY_OTHERS for g in gpus),
        "can_load": roles.can_load(user),
        "is_admin": roles.can_administer(user),
        "refresh_seconds": FAST_REFRESH_SECONDS if transitioning else settings.DASHBOARD_REFRESH_SECONDS,
        "now": now,
        "gateway_base_url": base_url,
        "quota": quota_panel(user) if any_quota else None,
    }


def render_partial(request, flash=None, status=200, template="partials/dashboard_content.html"):
    """The cards and the load form (after an action, or the Refresh button), or with `template`
    partials/dashboard_live.html the cards alone (the page's polling)."""
    try:
        context = dashboard_context(request.user, request.build_absolute_uri("/"))
    except DatabaseError as exc:
        context, status = {"db_error": str(exc), "refresh_seconds": 5}, 503
    context["flash"] = flash
    return render(request, template, context, status=status)


@role_required(roles.can_read)
def _dashboard(request):
    if request.htmx and not request.htmx.boosted:
        live = request.GET.get("part") == "live"
        return render_partial(request, template=LIVE_TEMPLATE if live else "partials/dashboard_content.html")
    broker = _broker_status()
    context = {"broker": broker}
    try:
        context.update(dashboard_context(request.user, request.build_absolute_uri("/")))
        status = 200
    except DatabaseError as exc:
        context.update(db_error=str(exc), refresh_seconds=5)
        status = 503
    return render(request, "dashboard.html", context, status=status)


@require_GET
def dashboard(request):
    """The page, or for htmx refreshes the cards only. With the database down even the session cannot
    be read: answer a plain page that says so instead of a server error."""
    try:
        return _dashboard(request)
    except DatabaseError as exc:
        return render(request, "database_down.html", {"error": str(exc)}, status=503)
