"""Reconcile a host's instances with its processes: when its worker starts and every RECONCILE_SECONDS.

Live processes are adopted, dead ones become `crashed` (and maybe restart), work lost with a killed worker
is redone, and llama-servers that no active instance owns are reported as orphans."""

import logging
from collections import Counter
from datetime import timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from gpus.models import Host

from . import dispatch, launch, lease, load, model_files, orphans, processes, stop
from .events import record
from .models import GpuInstance, InstanceEvent, InstanceGpu
from .state import last_change, transition

logger = logging.getLogger(__name__)

Status = GpuInstance.Status
Kind = InstanceEvent.Kind

# When this worker process started (imported before the pool forks): a running instance whose last change
# is older was started by a worker that is gone (adopted), and work that holds no lease and last changed
# before it was lost with that worker.
WORKER_STARTED_AT = timezone.now()
# Work that holds no lease (a load waiting in the queue) counts as lost after this long without a change.
GRACE_SECONDS = 10
# A load or unload is sent again at most this often (each wait twice the one before); then it is given up:
# the instance fails (a load) or is stopped by the reconcile pass itself (an unload).
MAX_RESENDS = 3
# The events of a resend are of kind RESENT (their detail, for people, says which): they are counted.
RESENT = "sent again"  # how their detail begins (wording only)


def reconcile_host(host_name: str) -> dict[str, int]:
    """One pass over the host's active instances. Returns a count of what was done, for logs and tests."""
    host = Host.objects.filter(name=host_name).first()
    if host is None:
        return {}
    # A reconcile pass is a heartbeat of the host's worker, as a GPU refresh is (see hosts.py).
    Host.objects.filter(pk=host.pk).update(last_seen=timezone.now())
    done: Counter[str] = Counter()
    active = GpuInstance.objects.filter(host=host, status__in=GpuInstance.ACTIVE_STATUSES)
    for instance in active.select_related("model", "host"):
        if instance.log_path:
            processes.cap_log(instance.log_path)
        check = {
            Status.PENDING: _check_pending,
            Status.STARTING: _check_starting,
            Status.RUNNING: _check_running,
            Status.STOPPING: _check_stopping,
            Status.UNKNOWN: _check_unknown,
        }[instance.status]
        outcome = check(instance)
        if outcome:
            done[outcome] += 1
    for orphan in orphans.find_orphans(host):
        done["orphans"] += 1
        logger.warning("orphan llama-server on %s: %s", host.name, orphan)
    try:  # which registered models this host can serve; a failure here must not break the pass
        with transaction.atomic():
            model_files.check_on_this_host(host)
    except Exception:
        logger.exception("%s: checking the model files failed", host.name)
    return dict(done)


def _is_lost(instance: GpuInstance, extra_seconds: float = 0, worker_started_at=None) -> bool:
    """Nobody works on the instance any more. A lease settles it: run out, nobody does; held, somebody does
    unless it was last renewed before the host's worker started (by its previous worker, now gone).
    Without one (waiting in the queue), it is lost after the grace time or a worker restart.
    `worker_started_at`: when the host's worker started (default: this process, on the host's worker)."""
    started = WORKER_STARTED_AT if worker_started_at is None else worker_started_at
    expired = lease.lease_expired(instance)
    if expired is not None:
        renewed = instance.lease_expires_at - timedelta(seconds=lease.lease_seconds())
        return expired or renewed < started
    changed = last_change(instance)
    if changed < started:
        return True
    return (timezone.now() - changed).total_seconds() > GRACE_SECONDS + extra_seconds


def _resends(instance: GpuInstance) -> int:
    return instance.events.filter(kind=Kind.RESENT).count()


def _resend(instance: GpuInstance, task_name: str, what: str) -> str | None:
    """Send the task again unless it was sent MAX_RESENDS times already; None when it was."""
    count = _resends(instance)
    if count >= MAX_RESENDS:
        return None
    record(
        Kind.RESENT,
        instance=instance,
        detail=f"{RESENT} to {instance.host.queue}: no worker took the {what} ({count + 1} of {MAX_RESENDS})",
    )
    dispatch.send_again(task_name, instance, at_once=False)
    return "resent"


def _check_running(instance: GpuInstance) -> str | None:
    if processes.is_alive(instance.pid, instance.process_create_time):
        if last_change(instance) < WORKER_STARTED_AT:
            record(
                Kind.ADOPTED,
                instance=instance,
                detail=f"pid {instance.pid} still running after a worker restart",
            )
            return "adopted"
        return None
    return "crashed" if crash(instance) else None


def _check_starting(instance: GpuInstance) -> str | None:
    """A start whose worker holds its lease is left alone; an abandoned one converges in this pass: the
    process is adopted (running if healthy, else watched by a new task), or the instance fails."""
    if not _is_lost(instance):
        return None
    if not instance.pid:
        tagged = launch.find_tagged(instance)
        if tagged:
            # The worker died between starting llama-server and recording it.
            updated = GpuInstance.objects.filter(pk=instance.pk, status=Status.STARTING, pid=None).update(
                pid=tagged,
                process_create_time=processes.create_time_of(tagged),
                log_path=str(launch.log_path_for(instance)),
            )
            if not updated:
                return None
            record(Kind.ADOPTED, instance=instance, detail=f"found pid {tagged} by its instance tag")
            instance.refresh_from_db()
        else:
            return _start_over(instance)
    if not processes.is_alive(instance.pid, instance.process_create_time):
        code = processes.exit_code_of(instance.pid, instance.log_path)
        # The worker gave the load up but could not record why (the database was away): its log says.
        cause = processes.failure_note(instance.log_path)
        stop.fail(
            instance,
            f"the load failed: {cause}"
            if cause
            else "llama-server exited while loading, and the worker that started it was lost",
            exit_code=code,
            expected=[Status.STARTING],
        )
        return "failed"
    if instance.port and processes.health_status(instance.port) == 200:
        load.adopt_running(instance)
        return "adopted"
    if load.seconds_since_start(instance) > settings.LOAD_TIMEOUT:
        stop.fail(
            instance,
            f"llama-server did not answer /health with 200 within {settings.LOAD_TIMEOUT}s",
            expected=[Status.STARTING],
        )
        return "failed"
    # Alive, still loading: a new task watches it, and holds the lease from now on.
    if not GpuInstance.objects.filter(
        pk=instance.pk, status=Status.STARTING, lease_expires_at=instance.lease_expires_at
    ).update(lease_expires_at=lease.lease_until(lease.lease_seconds())):
        return None
    record(Kind.ADOPTED, instance=instance, detail=f"waiting for pid {instance.pid} to become healthy")
    dispatch.send_again(dispatch.RESUME_START, instance, at_once=False)
    return "adopted"


def _start_over(instance: GpuInstance) -> str | None:
    """Claimed by a worker that died before starting anything: load again, a limited number of times."""
    if _resends(instance) >= MAX_RESENDS:
        stop.fail(
            instance,
            f"the worker did not take the load (sent {MAX_RESENDS + 1} times)",
            expected=[Status.STARTING],
        )
        return "failed"
    if transition(
        instance,
        Status.PENDING,
        expected=[Status.STARTING],
        event_kind=Kind.RESENT,
        detail=f"{RESENT}: the worker was lost before llama-server started; loading again",
        lease_expires_at=None,
    ):
        dispatch.send_again(dispatch.LOAD_MODEL, instance, at_once=False)
        return "reloaded"
    return None


def _check_pending(instance: GpuInstance) -> str | None:
    tagged = launch.find_tagged(instance)
    if tagged and transition(
        instance,
        Status.STARTING,
        expected=[Status.PENDING],
        event_kind=Kind.ADOPTED,
        detail=f"found pid {tagged} by its instance tag",
        pid=tagged,
        process_create_time=processes.create_time_of(tagged),
        log_path=str(launch.log_path_for(instance)),
    ):
        dispatch.send_again(dispatch.RESUME_START, instance, at_once=False)
        return "adopted"
    # Not started: the beat's pass sends the load again or gives it up (resend_pending), whether or not
    # this host's worker takes anything from its queue.
    return None


def resend_pending(instance: GpuInstance, worker_started_at) -> str | None:
    """A load that no worker took is sent again, each time waiting twice as long, then given up with the
    host named. Run by beat on the default queue (models_app/hosts.py), not by the host's own reconcile
    pass: a host whose worker takes nothing from its queue runs no reconcile pass either."""
    # A restart waits out its back-off before it counts as lost; each resend waits twice as long.
    backoff = 2**instance.restart_count if instance.restart_count else 0
    resends = _resends(instance)
    extra = backoff + GRACE_SECONDS * (2**resends - 1)
    if not _is_lost(instance, extra_seconds=extra, worker_started_at=worker_started_at):
        return None
    # The load is idempotent: a duplicate does nothing.
    if _resend(instance, dispatch.LOAD_MODEL, "load"):
        return "resent"
    host = instance.host
    stop.fail(
        instance,
        f"host {host.name} did not take the load (sent {MAX_RESENDS + 1} times to {host.queue}, the last "
        f"{GRACE_SECONDS + extra:.0f}s ago): its worker takes no work from its queue",
        expected=[Status.PENDING],
    )
    return "failed"


def give_up_unload(instance: GpuInstance, worker_started_at) -> str | None:
    """The host's own pass sends an unload again and at last stops the process itself (_check_stopping).
    When it has not acted for far longer than that takes, the host's worker takes no work: the unload
    fails, naming the host. Run by beat on the default queue (models_app/hosts.py)."""
    # Longer than any wait of the host's own pass: a resend's, or the stop it does after the last one.
    wait = GRACE_SECONDS * 2 ** (MAX_RESENDS + 1) + settings.STOP_TIMEOUT + 2 * settings.RECONCILE_SECONDS
    if not _is_lost(instance, extra_seconds=wait, worker_started_at=worker_started_at):
        return None
    host = instance.host
    reason = (
        f"host {host.name} did not take the unload within {GRACE_SECONDS + wait:.0f}s: its worker takes no "
        f"work from {host.queue}; its llama-server may still run (reported as an orphan when the worker "
        "takes work again)"
    )
    if not transition(
        instance,
        Status.FAILED,
        expected=[Status.STOPPING],
        event_kind=Kind.FAILED,
        detail=reason,
        error=reason,
        stopped_at=timezone.now(),
        lease_expires_at=None,
    ):
        return None
    logger.warning("instance %s failed: %s", instance.pk, reason)
    return "failed"


def _check_stopping(instance: GpuInstance) -> str | None:
    if not _is_lost(instance, extra_seconds=settings.STOP_TIMEOUT):
        return None
    if _resend(instance, dispatch.UNLOAD_MODEL, "unload"):
        return "resent"
    # Nobody takes the unload: this pass runs on the host's worker, so it stops the process itself.
    stop.unload_instance(instance.pk)
    return "stopped"


def _check_unknown(instance: GpuInstance) -> str | None:
    """The instance's host was down and answers again: a process that outlived the silence is adopted as it
    is (no restart), one that died meanwhile is crashed (or failed, if it was still loading) with its exit."""
    alive = instance.pid and processes.is_alive(instance.pid, instance.process_create_time)
    if not alive:
        if instance.loaded_at is None:
            code = processes.exit_code_of(instance.pid, instance.log_path) if instance.pid else None
            stop.fail(
                instance,
                "llama-server was loading when its host went down, and is gone now",
                exit_code=code,
                expected=[Status.UNKNOWN],
            )
            return "failed"
        return "crashed" if crash(instance, expected=[Status.UNKNOWN]) else None
    back = Status.RUNNING if instance.loaded_at else Status.STARTING
    if transition(
        instance,
        back,
        expected=[Status.UNKNOWN],
        event_kind=Kind.ADOPTED,
        detail=f"pid {instance.pid} outlived the silence of host {instance.host.name}: {back} again",
        # A start is watched again by the reconcile passes (its lease is gone: adopted when healthy).
        lease_expires_at=None,
    ):
        return "adopted"
    return None


def crash(instance: GpuInstance, expected=(Status.RUNNING,)) -> bool:
    """A running instance's process is gone: `crashed` with its exit code and log tail; maybe restart."""
    if not stop.record_crash(instance, expected):
        return False
    maybe_restart(instance)
    return True


class _Lost(Exception):
    pass


def maybe_restart(instance: GpuInstance) -> bool:
    """Restart a crashed instance on the same GPUs if its model asks for it, with a growing back-off
    (2 s, 4 s, 8 s, ...). The GPUs are claimed again first; if someone else took one, it stays crashed."""
    model = instance.model
    if not model.restart_on_crash:
        return False
    if instance.restart_count >= model.max_restarts:
        record(
            Kind.CRASHED,
            instance=instance,
            detail=f"not restarted: {instance.restart_count} restarts already",
        )
        return False
    count = instance.restart_count + 1
    delay = 2**count
    try:
        with transaction.atomic():
            InstanceGpu.objects.filter(instance=instance).update(active=True)
            if not transition(
                instance,
                Status.PENDING,
                expected=[Status.CRASHED],
                event_kind=Kind.RESTARTING,
                detail=f"restart {count} of {model.max_restarts} in {delay}s",
                restart_count=count,
                pid=None,
                process_create_time=None,
                port=None,
                loaded_at=None,
            ):
                raise _Lost()
    except IntegrityError:
        record(Kind.RESTARTING, instance=instance, detail="not restarted: another instance holds its GPU now")
        return False
    except _Lost:
        return False
    dispatch.send_again(dispatch.LOAD_MODEL, instance, at_once=False, countdown=delay)
    return True
