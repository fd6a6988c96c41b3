"""Load on demand and idle unload: what the gateway asks of the model lifecycle. Synchronous (the gateway
calls it through asgiref's `sync_to_async`); every load and unload goes through `services`, so the same
validation, queue, events and database guarantees hold as for a load by hand.

- `ensure_running(model, actor)`: a running instance of the model, loading it on demand if needed.
  Concurrent callers share one load: the database allows one active load on demand per model (a partial
  unique constraint) and one active instance per GPU, so a caller that loses the race waits for the
  winner's instance.
- `request_started` / `request_finished`: the in-flight count and last use of an instance.
- `expires_at(instance)`: when idle unload will take it (None: it stays).
- `unload_idle()`: the beat task's work.
- `unload_now(model, actor)`: Ollama's `keep_alive: 0`.

Idle unload rule (also in the README): an instance loaded on demand unloads once it has been idle (no
request in flight, none finished) for its keep-alive: the request's `keep_alive` (at most
GATEWAY_MAX_KEEP_ALIVE_SECONDS), else the model's `keep_alive_seconds`, else KEEP_ALIVE_SECONDS. An
instance loaded by hand stays, unless its model sets `keep_alive_seconds` (then that applies to it too, and
a request's keep_alive as well). A request's keep_alive may shorten the timer only of an instance its caller may
unload (the unload action's rule: operators their own instances, admins any); from anyone else it counts only
where it lengthens the timer, and the gateway says it was ignored. A model's `keep_alive_seconds` of 0, or a KEEP_ALIVE_SECONDS of 0 for models
that set none, means "never unloaded for idleness". An in-flight count older than the gateway's request
cap (GATEWAY_MAX_REQUEST_SECONDS, a web process killed mid-stream) is ignored.
"""

import logging
import time
from datetime import datetime, timedelta

from django.conf import settings
from django.db import connection, transaction
from django.db.models import Q
from django.utils import timezone

from accounts.roles import can_load, can_manage_instance, can_read

from . import placement, services
from .models import GpuInstance, InstanceEvent, ModelConfig

logger = logging.getLogger(__name__)

Status = GpuInstance.Status
POLL_SECONDS = 0.2
# What "a load on demand of this model" is: under way or running. A stopping one may overlap its successor.
LOADING_OR_RUNNING = (Status.PENDING, Status.STARTING, Status.RUNNING)
BUSY_RETRIES = 5
# After a load on demand fails, requests for the model get that failure for this long instead of starting
# another load each (a broken model under steady traffic would otherwise fill the audit trail).
FAILURE_BACKOFF_SECONDS = 30
# The idle unload's event is of kind IDLE_UNLOAD (the dashboard finds it by that); its detail, for people,
# says "idle for 30 min (keep-alive 30 min)".
IDLE_EVENT_PREFIX = "idle for "


# --- refusals ------------------------------------------------------------------------------------------


class GatewayRefusal(Exception):
    """A request the gateway answers with an error: `status` (HTTP), `message`, and `retry_after` (seconds,
    for a Retry-After header) where asking again later may help."""

    status = 503
    retry_after: int | None = None

    def __init__(self, message: str, *, status: int | None = None, retry_after: int | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if retry_after is not None:
            self.retry_after = retry_after


class NotAllowed(GatewayRefusal):
    """403 (401 for an anonymous request): the caller may not use, wake or unload the model."""

    status = 403


class NoCapacity(GatewayRefusal):
    """503 + Retry-After: no GPU to load on; the message names the busy GPUs and what keeps them busy.
    `freeing`: one of them is being unloaded (worth waiting for)."""

    status = 503
    freeing = False

    def __init__(self, message: str, retry_after: int = 60):
        super().__init__(message, retry_after=retry_after)


class LoadFailed(GatewayRefusal):
    """503: the load failed; the message carries its error."""

    status = 503


class Timeout(GatewayRefusal):
    """503 + Retry-After: the load did not become ready in time (it goes on; a later request finds it)."""

    status = 503
    retry_after = 10


# --- who may do what -----------------------------------------------------------------------------------


def _authenticated(actor) -> bool:
    return actor is not None and getattr(actor, "is_authenticated", False)


def check_use(model: ModelConfig, actor) -> None:
    """Any role may use a loaded model; anybody, where an admin allowed anonymous use of the model.
    `actor` is the request's user (None or AnonymousUser when anonymous)."""
    if model.allow_anonymous or can_read(actor):
        return
    if not _authenticated(actor):
        raise NotAllowed(
            "authentication required: send an API token (Authorization: Bearer lc_...)", status=401
        )
    raise NotAllowed(f"{actor.get_username()} has no role: ask an admin for the viewer role")


def check_wake(model: ModelConfig, actor) -> None:
    """Loading a model on demand: operators always; anyone who may use the model if it is `on_demand`."""
    check_use(model, actor)
    if can_load(actor) or model.on_demand:
        return
    raise NotAllowed(
        f"model {model.pk} is not loaded; loading it needs the operator role "
        "(or an admin marking the model on demand)",
        status=403 if _authenticated(actor) else 401,
    )


# --- keep-alive ----------------------------------------------------------------------------------------


# keep_alive_by of a request's keep_alive sent without credentials (not a valid username: they cannot clash).
ANONYMOUS = "(anonymous)"


def clamp_keep_alive(seconds: float) -> int:
    """A request's keep_alive within the admin's limit; negative (Ollama: forever) is the limit itself."""
    limit = settings.GATEWAY_MAX_KEEP_ALIVE_SECONDS
    if seconds < 0:
        return limit
    return min(int(seconds), limit)


def base_keep_alive(instance: GpuInstance) -> int | None:
    """The idle seconds the instance has without a request's keep_alive; None when it stays whatever a
    request asks (loaded by hand with no keep-alive in the registry, or a keep-alive of 0: never)."""
    model = instance.model
    if model.keep_alive_seconds is None:
        if not instance.loaded_on_demand:
            return None  # loaded by hand, and the registry says nothing: it stays
        base = settings.KEEP_ALIVE_SECONDS
    else:
        base = model.keep_alive_seconds
    return base or None


def keep_alive_of(instance: GpuInstance) -> int | None:
    """The idle seconds after which `instance` unloads, or None when it stays (see the module's rule)."""
    base = base_keep_alive(instance)
    if base is None:
        return None
    if instance.keep_alive_seconds is not None:
        return instance.keep_alive_seconds
    return base


def asker(actor) -> str:
    """keep_alive_by for a request of `actor`."""
    return actor.get_username() if _authenticated(actor) else ANONYMOUS


def apply_keep_alive(instance: GpuInstance, actor, seconds: float) -> bool:
    """Keep a request's keep_alive (clamped) on the instance for the idle timer. In full from a caller who
    may unload the instance; from anyone else only where it does not shorten the timer in effect (the
    row's own keep_alive, else the model's or the default), decided by the UPDATE itself so that a stale
    copy of the row cannot shorten it. False: ignored."""
    seconds = clamp_keep_alive(seconds)
    if can_manage_instance(actor, instance):
        _update(
            "{keep_alive_seconds} = %s, {keep_alive_by} = %s",
            "{id} = %s",
            [seconds, asker(actor), instance.pk],
        )
        applied = True
    else:
        base = base_keep_alive(instance)
        applied = base is not None and (
            _update(
                "{keep_alive_seconds} = %s, {keep_alive_by} = %s",
                "{id} = %s AND COALESCE({keep_alive_seconds}, %s) <= %s",
                [seconds, asker(actor), instance.pk, base, seconds],
            )
            == 1
        )
    if applied:
        instance.keep_alive_seconds, instance.keep_alive_by = seconds, asker(actor)
    return applied


def _max_request_seconds() -> int:
    return int(getattr(settings, "GATEWAY_MAX_REQUEST_SECONDS", 3600))


def _serving(instance: GpuInstance, now: datetime) -> bool:
    """A request is in flight, and recently enough that the count is not a leftover of a killed process."""
    if instance.in_flight <= 0 or instance.last_used_at is None:
        return False
    return now - instance.last_used_at < timedelta(seconds=_max_request_seconds())


def idle_since(instance: GpuInstance) -> datetime:
    """The last use, or the load's end when it was never used (a restart counts as a new load)."""
    times = [t for t in (instance.last_used_at, instance.loaded_at) if t is not None]
    return max(times) if times else instance.requested_at


def expires_at(instance: GpuInstance, now: datetime | None = None) -> datetime | None:
    """When idle unload will take this instance if no request comes (Ollama's /api/ps `expires_at`);
    None when it stays loaded. While it serves or starts: `keep_alive` from now."""
    keep_alive = keep_alive_of(instance)
    if keep_alive is None or instance.status not in LOADING_OR_RUNNING:
        return None
    now = now or timezone.now()
    if _serving(instance, now) or instance.status != Status.RUNNING:
        return now + timedelta(seconds=keep_alive)
    return idle_since(instance) + timedelta(seconds=keep_alive)


# --- requests ------------------------------------------------------------------------------------------


def request_started(
    instance_id: int,
    keep_alive_seconds: float | None = None,
    *,
    port: int | None = None,
    api_key: str | None = None,
    keep_alive_by: str = "",
) -> bool:
    """A gateway request begins on the instance: one more in flight, used now, and the request's keep_alive
    (clamped) kept for the idle timer with who asked — one UPDATE. The caller has checked that the asker may
    set it (`request_started_by` does). False when the instance is no longer running (an idle unload won the
    race): call `ensure_running` again, and do not call `request_finished` for this one.
    `port` and `api_key`: the caller's copy of the row (the gateway caches it), which must still describe this
    start of the instance (a restart keeps the row but gets a new port and key): False otherwise."""
    sets = "{in_flight} = {in_flight} + 1, {last_used_at} = %s"
    params: list = [connection.ops.adapt_datetimefield_value(timezone.now())]
    if keep_alive_seconds is not None:
        sets += ", {keep_alive_seconds} = %s, {keep_alive_by} = %s"
        params += [clamp_keep_alive(keep_alive_seconds), keep_alive_by]
    where = "{id} = %s AND {status} = %s"
    params += [instance_id, str(Status.RUNNING)]
    if port is not None:
        where += " AND {port} = %s"
        params.append(port)
    if api_key is not None:
        where += " AND {api_key} = %s"
        params.append(api_key)
    return _update(sets, where, params) == 1


def request_started_by(instance: GpuInstance, actor, keep_alive_seconds: float | None) -> tuple[bool, bool]:
    """`request_started` for `actor`'s request on the caller's copy of the row: (counted, whether the
    request's keep_alive was ignored: see `apply_keep_alive`). One UPDATE, two where the keep_alive comes
    from a caller who may not unload the instance."""
    trusted = keep_alive_seconds is None or can_manage_instance(actor, instance)
    counted = request_started(
        instance.pk,
        keep_alive_seconds if trusted else None,
        port=instance.port,
        api_key=instance.api_key,
        keep_alive_by=asker(actor),
    )
    if not counted or trusted:
        return counted, False
    return True, not apply_keep_alive(instance, actor, keep_alive_seconds)


def request_finished(instance_id: int) -> None:
    """A gateway request ended (answered, failed or disconnected): one fewer in flight (never below 0),
    and the idle timer starts now."""
    _update(
        "{in_flight} = CASE WHEN {in_flight} > 0 THEN {in_flight} - 1 ELSE 0 END, {last_used_at} = %s",
        "{id} = %s",
        [connection.ops.adapt_datetimefield_value(timezone.now()), instance_id],
    )


def _update(sets: str, where: str, params: list) -> int:
    """UPDATE GpuInstance rows in plain SQL (`{field}`: the field's column, quoted). These two run before and
    after every gateway request, and the ORM took ten times as long to build the statement as the database
    took to run it (0.4 ms against 0.04 ms on SQLite, on a busy two-core machine)."""
    quote = connection.ops.quote_name
    columns = {field.name: quote(field.column) for field in GpuInstance._meta.concrete_fields}
    sql = f"UPDATE {quote(GpuInstance._meta.db_table)} SET {sets} WHERE {where}".format(**columns)
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount


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
    """Place and request a load on demand. None when another request claimed the GPU (or started this
    model's load) at the same moment: look again."""
    while True:
        try:
            host, gpus = placement.choose_gpus(model)
            break
        except NoCapacity as exc:
            # A GPU being unloaded (keep_alive 0, an idle unload, a switch) is free within the stop
            # timeout: wait for it rather than refuse, as long as the caller's wait allows.
            if not exc.freeing or time.monotonic() + POLL_SECONDS >= deadline:
                raise
            time.sleep(POLL_SECONDS)
    user = actor if _authenticated(actor) else None
    try:
        return services.request_load(
            model_id=model.pk,
            gpu_spec=",".join(str(gpu.index) for gpu in gpus),
            host_name=host.name,
            actor=user,
            on_demand=True,
            note="" if user else "anonymous request",
        )
    except services.LoadRefused as exc:
        if exc.code == "busy":
            return None
        if exc.code == "forbidden":
            raise NotAllowed(exc.message) from None
        raise LoadFailed(f"could not load {model.pk}: {exc.message}") from None


def _check_down_host(model: ModelConfig) -> None:
    """LoadFailed (with Retry-After) while the model's load on demand sits on a host that is down: it may well
    still run there, and it comes back when the host does (one load on demand per model at a time)."""
    stranded = (
        GpuInstance.objects.filter(model=model, loaded_on_demand=True, status=Status.UNKNOWN)
        .select_related("host")
        .first()
    )
    if stranded is not None:
        raise LoadFailed(
            f"{model.pk} is loaded on host {stranded.host.name} (instance #{stranded.pk}), which is down "
            f"({stranded.host.down_reason()}); it is used again when the host answers, or after an admin "
            f"retires the host (manage.py clear_host {stranded.host.name} --retire)",
            retry_after=settings.HOST_TIMEOUT_SECONDS,
        )


def _check_recent_failure(model: ModelConfig) -> None:
    """LoadFailed (with Retry-After) while the model's last load on demand failed moments ago."""
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
        raise LoadFailed(
            f"loading {model.pk} failed {int((now - since).total_seconds())} s ago (instance #{failed.pk}): "
            f"{failed.error or 'no error recorded'}",
            retry_after=retry_after,
        )


def _wait(instance: GpuInstance, deadline: float) -> GpuInstance | None:
    """Until the instance runs (returned), fails (LoadFailed), is unloaded before it ran (None) or the
    deadline passes (Timeout)."""
    while True:
        instance.refresh_from_db()
        if instance.status == Status.RUNNING:
            return instance
        if instance.status in (Status.FAILED, Status.CRASHED):
            raise LoadFailed(
                f"loading {instance.model_id} failed: {instance.error or instance.status}"
                f" (instance #{instance.pk})"
            )
        if instance.status in (Status.STOPPING, Status.STOPPED):
            return None
        if time.monotonic() >= deadline:
            raise Timeout(
                f"{instance.model_id} is still {instance.status} (instance #{instance.pk} on "
                f"{instance.host.name} GPU {instance.gpu_ids}); try again shortly"
            )
        time.sleep(POLL_SECONDS)


def ensure_running(
    model: ModelConfig, actor, *, keep_alive_seconds: float | None = None, timeout: float | None = None
) -> GpuInstance:
    """A running instance of `model`: one that runs (any host), else the load under way (waited for), else
    a load on demand if `actor` may wake the model (on the GPU `placement.choose_gpus` picks). Waits at
    most `timeout` seconds (GATEWAY_LOAD_TIMEOUT_SECONDS). `keep_alive_seconds`: the request's keep_alive,
    kept on the instance as `apply_keep_alive` allows. Raises NotAllowed, NoCapacity, LoadFailed or Timeout."""
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
            instance = _load(model, actor, deadline)
            if instance is None:
                busy += 1
                if busy >= BUSY_RETRIES:
                    placement.choose_gpus(model)  # names what is busy now (NoCapacity), if it is
                    raise NoCapacity(f"no free GPU to load {model.pk} on: other loads keep taking them")
                if time.monotonic() >= deadline:
                    raise Timeout(f"{model.pk} could not be placed in time; try again shortly")
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
    if not _authenticated(actor):
        raise NotAllowed("unloading a model needs a logged-in operator or an API token", status=401)
    instances = list(
        GpuInstance.objects.filter(model=model, status__in=LOADING_OR_RUNNING).select_related("host", "model")
    )
    for instance in instances:
        if not can_manage_instance(actor, instance):
            raise NotAllowed(f"{actor.get_username()} may not unload instance #{instance.pk} of {model.pk}")
    unloaded = []
    for instance in instances:
        try:
            unloaded.append(
                services.request_unload(
                    instance=instance, actor=actor, detail="keep_alive 0 (gateway request)"
                )
            )
        except services.LoadRefused as exc:
            if exc.code == "forbidden":
                raise NotAllowed(exc.message) from None
            if exc.code == "unavailable":
                raise LoadFailed(exc.message) from None
            # "not loaded": it ended meanwhile
    return unloaded


def describe_idle(seconds: float) -> str:
    """ "45 s", "30 min", "2 h" for events."""
    if seconds < 120:
        return f"{int(seconds)} s"
    if seconds < 120 * 60:
        return f"{int(seconds // 60)} min"
    return f"{int(seconds // 3600)} h"


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
        if keep_alive is None or _serving(row, now):
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
                f"; {row.in_flight} in-flight request(s) ignored: none for over {_max_request_seconds()} s"
            )
        return services.request_unload(
            instance=row, actor=None, detail=detail, event_kind=InstanceEvent.Kind.IDLE_UNLOAD
        )


def unload_idle(now: datetime | None = None) -> list[GpuInstance]:
    """Beat: unload every running instance idle for longer than its keep-alive. Returns those unloaded."""
    now = now or timezone.now()
    candidates = GpuInstance.objects.filter(status=Status.RUNNING).filter(
        Q(loaded_on_demand=True) | Q(model__keep_alive_seconds__gt=0)
    )
    unloaded = []
    for instance in candidates.select_related("model"):
        expires = expires_at(instance, now)
        if expires is None or expires > now:
            continue
        try:
            row = _unload_if_idle(instance.pk, now)
        except services.LoadRefused as exc:  # the broker is down: the next pass tries again
            logger.warning("idle unload of instance #%s refused: %s", instance.pk, exc.message)
            continue
        if row is not None:
            logger.info("unloaded idle instance #%s (%s)", row.pk, row.model_id)
            unloaded.append(row)
    return unloaded
