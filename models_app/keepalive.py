"""Keep-alive: how long an idle instance stays, when idle unload takes it (`expires_at`), and the in-flight
count and last use of each instance (`request_started` / `request_finished`, before and after every gateway
request). Policy below placement and load on demand, which both read it; it queues nothing (idle unload
itself is models_app.ondemand's).

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

from datetime import datetime, timedelta

from django.conf import settings
from django.db import DEFAULT_DB_ALIAS, connection, connections
from django.utils import timezone

from accounts.roles import can_manage_instance
from utilities.dbutil import execute, now_value

from .models import GpuInstance

Status = GpuInstance.Status
# What "a load on demand of this model" is: under way or running. A stopping one may overlap its successor.
LOADING_OR_RUNNING = (Status.PENDING, Status.STARTING, Status.RUNNING)


def authenticated(actor) -> bool:
    return actor is not None and getattr(actor, "is_authenticated", False)


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
    return actor.get_username() if authenticated(actor) else ANONYMOUS


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


def max_request_seconds() -> int:
    return int(getattr(settings, "GATEWAY_MAX_REQUEST_SECONDS", 3600))


def serving(instance: GpuInstance, now: datetime) -> bool:
    """A request is in flight, and recently enough that the count is not a leftover of a killed process."""
    if instance.in_flight <= 0 or instance.last_used_at is None:
        return False
    return now - instance.last_used_at < timedelta(seconds=max_request_seconds())


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
    if serving(instance, now) or instance.status != Status.RUNNING:
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
    db = connections[DEFAULT_DB_ALIAS]
    sets = "{in_flight} = {in_flight} + 1, {last_used_at} = %s"
    params: list = [now_value(db)]
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
    return _update(sets, where, params, db) == 1


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
    db = connections[DEFAULT_DB_ALIAS]
    _update(
        "{in_flight} = CASE WHEN {in_flight} > 0 THEN {in_flight} - 1 ELSE 0 END, {last_used_at} = %s",
        "{id} = %s",
        [now_value(db), instance_id],
        db,
    )


def _update(sets: str, where: str, params: list, db=None) -> int:
    """UPDATE GpuInstance rows in plain SQL (`{field}`: the field's column, quoted). These two run before and
    after every gateway request, and the ORM took ten times as long to build the statement as the database
    took to run it (0.4 ms against 0.04 ms on SQLite, on a busy two-core machine); each statement is built
    once per database vendor. `db`: this thread's connection, where the caller has it already."""
    db = db or connections[DEFAULT_DB_ALIAS]
    key = (db.vendor, sets, where)
    sql = _statements.get(key)
    if sql is None:
        quote = connection.ops.quote_name
        columns = {field.name: quote(field.column) for field in GpuInstance._meta.concrete_fields}
        sql = f"UPDATE {quote(GpuInstance._meta.db_table)} SET {sets} WHERE {where}".format(**columns)
        _statements[key] = sql
    return execute(sql, params, db=db)


_statements: dict[tuple[str, str, str], str] = {}  # a handful: the shapes of `_update`'s callers


def describe_idle(seconds: float) -> str:
    """ "45 s", "30 min", "2 h" for events."""
    if seconds < 120:
        return f"{int(seconds)} s"
    if seconds < 120 * 60:
        return f"{int(seconds // 60)} min"
    return f"{int(seconds // 3600)} h"
