"""Load on demand and idle unload: what the gateway asks of the model lifecycle. Synchronous (the gateway
calls it through asgiref's `sync_to_async`); every load and unload goes through `services`, so the same
validation, queue, events and database guarantees hold as for a load by hand. Refusals are
models_app.errors.Refused; the gateway answers them in its dialect.

- `ensure_running(model, actor)`: a running instance of the model, loading it on demand if needed.
  Concurrent callers share one load: the database allows one active load on demand per model (a partial
  unique constraint) and admission refuses the same model twice on a GPU, so a caller that loses the race
  waits for the winner's instance.
- `unload_idle()`: the beat task's work, by the idle rule of models_app.keepalive.
- `unload_now(model, actor)`: Ollama's `keep_alive: 0`.
"""

import logging
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from accounts.roles import can_load, can_manage_instance, can_read
from policy import pins
from policy.reasons import PolicyRefusal

from . import making_room, placement, services
from .errors import Refused
from .keepalive import (
    ANONYMOUS,
    LOADING_OR_RUNNING,
    apply_keep_alive,
    authenticated,
    describe_idle,
    expires_at,
    idle_since,
    keep_alive_of,
    max_request_seconds,
    serving,
)
from .models import GpuInstance, InstanceEvent, ModelConfig

logger = logging.getLogger(__name__)

Status = GpuInstance.Status
POLL_SECONDS = 0.2
BUSY_RETRIES = 5
# Retry-After of a load not ready in time (it goes on: a later request finds it), and of no GPU with room.
TIMEOUT_RETRY_SECONDS = 10
NO_ROOM_RETRY_SECONDS = 60
# After a load on demand fails, requests for the model get that failure for this long instead of starting
# another load each (a broken model under steady traffic would otherwise fill the audit trail).
FAILURE_BACKOFF_SECONDS = 30
# The idle unload's event is of kind IDLE_UNLOAD (the dashboard finds it by that); its detail, for people,
# says "idle for 30 min (keep-alive 30 min)".
IDLE_EVENT_PREFIX = "idle for "


# --- who may do what -----------------------------------------------------------------------------------


def check_use(model: ModelConfig, actor) -> None:
    """Any role may use a loaded model; anybody, where an admin allowed anonymous use of the model.
    `actor` is the request's user (None or AnonymousUser when anonymous)."""
    if model.allow_anonymous or can_read(actor):
        return
    if not authenticated(actor):
        raise Refused(
            "authentication required: send an API token (Authorization: Bearer lc_...)", code="unauthorized"
        )
    raise Refused(f"{actor.get_username()} has no role: ask an admin for the viewer role", code="forbidden")


def check_wake(model: ModelConfig, actor) -> None:
    """Loading a model on demand: operators always; anyone who may use the model if it is `on_demand`."""
    check_use(model, actor)
    if can_load(actor) or model.on_demand:
        return
    raise Refused(
        f"model {model.pk} is not loaded; loading it needs the operator role "
        "(or an admin marking the model on demand)",
        code="forbidden" if authenticated(actor) else "unauthorized",
    )


# --- load on demand ------------------------------------------------------------------------------------


def _current(model: ModelConfig) -> GpuInstance | None:
    """The model's running instance with the fewest requests in flight, else one that is starting."""
    rows = list(
        GpuInstance.objects.filter(model=model, status__in=LOADING_OR_RUNNING)
        .select_related("host", "model")
        .order_by("in_flight", "pk")
    )
    running = [row for row in rows if row.status == Status.RUNNING]
    return (running or rows or [None])[0]


def _load(model: ModelConfig, actor, deadline: float) -> GpuInstance | None:
    """Place and request a load on demand, making room by evicting idle models where nothing fits
    (models_app/making_room.py). Returns the model's load under way where another request started it in the
    meantime (joined, never refused), or None when another request claimed the GPU at the same moment: look
    again."""
    user = actor if authenticated(actor) else None
    room, refusals = None, 0
    while True:
        try:
            host, gpus = placement.choose_gpus(model, requester=user)
            break
        except Refused as exc:  # no GPU with room
            refusals += 1
            room = making_room.find(model, requester=user)
            if room is not None:
                host, gpus = room.host, room.gpus
                break
            joined = _current(model)
            if joined is not None:
                return joined
            # A GPU being unloaded (keep_alive 0, an idle unload, a switch) is free within the stop
            # timeout: wait for it rather than refuse, as long as the caller's wait allows. A first refusal is
            # looked at again too: placement reads the GPUs twice, and a stop or a load finishing in between
            # makes a snapshot that holds neither.
            if (not exc.freeing and refusals > 1) or time.monotonic() + POLL_SECONDS >= deadline:
                raise making_room.no_room(model, exc, requester=user) from None
            time.sleep(POLL_SECONDS)
    try:
        return services.request_load(
            model_id=model.pk,
            gpu_spec=",".join(str(gpu.index) for gpu in gpus),
            host_name=host.name,
            actor=user,
            on_demand=True,
            note="" if user else "anonymous request",
            room=room,
        )
    except Refused as exc:
        if isinstance(exc, PolicyRefusal) or exc.code == "forbidden":
            raise  # the team policy's answer (a quota's 429, a reservation's 409) and a 403 go as they are
        if exc.code == "busy":
            return None
        raise Refused(f"could not load {model.pk}: {exc.message}", code="load_failed") from None


def _check_down_host(model: ModelConfig) -> None:
    """Refused (load_failed, with Retry-After) while the model's load on demand sits on a host that is down: it may well
    still run there, and it comes back when the host does (one load on demand per model at a time)."""
    stranded = (
        GpuInstance.objects.filter(model=model, loaded_on_demand=True, status=Status.UNKNOWN)
        .select_related("host")
        .first()
    )
    if stranded is not None:
        raise Refused(
            f"{model.pk} is loaded on host {stranded.host.name} (instance #{stranded.pk}), which is down "
            f"({stranded.host.down_reason()}); it is used again when the host answers, or after an admin "
            f"retires the host (manage.py clear_host {stranded.host.name} --retire)",
            code="load_failed",
            retry_after=settings.HOST_TIMEOUT_SECONDS,
        )


def _check_recent_failure(model: ModelConfig) -> None:
    """Refused (load_failed, with Retry-After) while the model's last load on demand failed moments ago."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=FAILURE_BACKOFF_SECONDS)
    failed = (
        GpuInstance.objects.filter(model=model, loaded_on_demand=True, status=Status.FAILED)
        .filter(Q(stopped_at__gte=cutoff) | Q(stopped_at=None, requested_at__gte=cutoff))
        .order_by("-requested_at")
        .first()
    )
    if failed is not None:
        since = failed.stopped_at or failed.requested_at
        retry_after = max(1, FAILURE_BACKOFF_SECONDS - int((now - since).total_seconds()))
        raise Refused(
            f"loading {model.pk} failed {int((now - since).total_seconds())} s ago (instance #{failed.pk}): "
            f"{failed.error or 'no error recorded'}",
            code="load_failed",
            retry_after=retry_after,
        )


def _wait(instance: GpuInstance, deadline: float) -> GpuInstance | None:
    """Until the instance runs (returned), fails (Refused load_failed), is unloaded before it ran (None) or
    the deadline passes (Refused timeout, retry after 10 s)."""
    while True:
        instance.refresh_from_db()
        if instance.status == Status.RUNNING:
            return instance
        if instance.status in (Status.FAILED, Status.CRASHED):
            raise Refused(
                f"loading {instance.model_id} failed: {instance.error or instance.status}"
                f" (instance #{instance.pk})",
                code="load_failed",
            )
        if instance.status in (Status.STOPPING, Status.STOPPED):
            return None
        if time.monotonic() >= deadline:
            raise Refused(
                f"{instance.model_id} is still {instance.status} (instance #{instance.pk} on "
                f"{instance.host.name} GPU {instance.gpu_ids}); try again shortly",
                code="timeout",
                retry_after=TIMEOUT_RETRY_SECONDS,
            )
        time.sleep(POLL_SECONDS)


def ensure_running(
    model: ModelConfig, actor, *, keep_alive_seconds: float | None = None, timeout: float | None = None
) -> GpuInstance:
    """A running instance of `model`: one that runs (any host), else the load under way (waited for), else
    a load on demand if `actor` may wake the model (on the GPU `placement.choose_gpus` picks). Waits at
    most `timeout` seconds (GATEWAY_LOAD_TIMEOUT_SECONDS). `keep_alive_seconds`: the request's keep_alive,
    kept on the instance as `apply_keep_alive` allows. Raises Refused: unauthorized, forbidden, busy (no GPU with
    room), load_failed or timeout."""
    check_use(model, actor)
    timeout = settings.GATEWAY_LOAD_TIMEOUT_SECONDS if timeout is None else timeout
    deadline = time.monotonic() + timeout
    busy = 0
    while True:
        instance = _current(model)
        if instance is None:
            check_wake(model, actor)
            _check_recent_failure(model)
            _check_down_host(model)
            try:
                instance = _load(model, actor, deadline)
            except Refused as refusal:  # no room: unless another request's load of this model began meanwhile
                instance = _current(model) if refusal.code == "busy" else None
                if instance is None:
                    raise
            if instance is None:
                busy += 1
                if busy >= BUSY_RETRIES:
                    placement.choose_gpus(model)  # names what is busy now, if it is
                    raise Refused(
                        f"no free GPU to load {model.pk} on: other loads keep taking them",
                        code="busy",
                        retry_after=NO_ROOM_RETRY_SECONDS,
                    )
                if time.monotonic() >= deadline:
                    raise Refused(
                        f"{model.pk} could not be placed in time; try again shortly",
                        code="timeout",
                        retry_after=TIMEOUT_RETRY_SECONDS,
                    )
                time.sleep(POLL_SECONDS)
                continue
        if instance.status != Status.RUNNING:
            instance = _wait(instance, deadline)
            if instance is None:
                continue  # unloaded before it was ready: look again
        if keep_alive_seconds is not None:
            apply_keep_alive(instance, actor, keep_alive_seconds)
        return instance


# --- unload --------------------------------------------------------------------------------------------


def unload_now(model: ModelConfig, actor) -> list[GpuInstance]:
    """Ollama's `keep_alive: 0`: unload the model's instances (loading or running) with the operator rules
    (operators their own, admins any). All or nothing: refused if the actor may not unload one of them."""
    if not authenticated(actor):
        raise Refused("unloading a model needs a logged-in operator or an API token", code="unauthorized")
    instances = list(
        GpuInstance.objects.filter(model=model, status__in=LOADING_OR_RUNNING).select_related("host", "model")
    )
    for instance in instances:
        if not can_manage_instance(actor, instance):
            raise Refused(
                f"{actor.get_username()} may not unload instance #{instance.pk} of {model.pk}",
                code="forbidden",
            )
    unloaded = []
    for instance in instances:
        try:
            unloaded.append(
                services.request_unload(
                    instance=instance, actor=actor, detail="keep_alive 0 (gateway request)"
                )
            )
        except Refused as exc:
            if exc.code in ("forbidden", "unavailable"):
                raise
            # "not loaded": it ended meanwhile
    return unloaded


def _unload_if_idle(instance_id: int, now: datetime) -> GpuInstance | None:
    """Check again with the row locked (a request that starts meanwhile waits for the unload and then
    finds the instance stopping), then unload through the services with the reason."""
    with transaction.atomic():
        row = (
            GpuInstance.objects.select_for_update(of=("self",))
            .filter(pk=instance_id, status=Status.RUNNING)
            .select_related("host", "model")
            .first()
        )
        if row is None:
            return None
        keep_alive = keep_alive_of(row)
        if keep_alive is None or serving(row, now):
            return None
        idle = (now - idle_since(row)).total_seconds()
        if idle < keep_alive:
            return None
        detail = f"{IDLE_EVENT_PREFIX}{describe_idle(idle)} (keep-alive {describe_idle(keep_alive)}"
        if row.keep_alive_seconds is not None and row.keep_alive_by:  # a request's keep_alive: whose
            who = (
                "an anonymous request" if row.keep_alive_by == ANONYMOUS else f"{row.keep_alive_by}'s request"
            )
            detail += f", asked by {who}"
        detail += ")"
        if row.in_flight > 0:
            detail += (
                f"; {row.in_flight} in-flight request(s) ignored: none for over {max_request_seconds()} s"
            )
        return services.request_unload(
            instance=row, actor=None, detail=detail, event_kind=InstanceEvent.Kind.IDLE_UNLOAD
        )


def unload_idle(now: datetime | None = None) -> list[GpuInstance]:
    """Beat: unload every running instance idle for longer than its keep-alive, except pinned ones (the team
    policy: never unloaded automatically). Returns those unloaded."""
    now = now or timezone.now()
    candidates = (
        GpuInstance.objects.filter(status=Status.RUNNING)
        .filter(Q(loaded_on_demand=True) | Q(model__keep_alive_seconds__gt=0))
        .exclude(pk__in=pins.pinned_instance_ids())
    )
    unloaded = []
    for instance in candidates.select_related("model"):
        expires = expires_at(instance, now)
        if expires is None or expires > now:
            continue
        try:
            row = _unload_if_idle(instance.pk, now)
        except Refused as exc:  # the broker is down: the next pass tries again
            logger.warning("idle unload of instance #%s refused: %s", instance.pk, exc.message)
            continue
        if row is not None:
            logger.info("unloaded idle instance #%s (%s)", row.pk, row.model_id)
            unloaded.append(row)
    return unloaded
