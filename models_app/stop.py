"""How an instance ends: unloaded (its process stopped), failed, or crashed, each with what its process left
(exit code, log tail). Called by the worker of the instance's host (tasks.py), by load.py when a load fails or
is cancelled, and by reconcile; never inside an HTTP request. Imports nothing of the load (load.py calls this
module, never the reverse)."""

import logging

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection
from django.utils import timezone

from . import memory
from .launch import find_tagged, log_path_for
from .lease import lease_until
from .models import GpuInstance, InstanceEvent
from .processes import (
    create_time_of,
    exit_code_of,
    is_alive,
    log_tail,
    note_failure,
    signal_note,
    stop_process,
)
from .state import transition

logger = logging.getLogger(__name__)

Status = GpuInstance.Status
Kind = InstanceEvent.Kind


def stop_pid(
    pid: int, create_time: float | None, timeout: float | None = None, while_it_exits=None
) -> str | None:
    """Stop the process (group). None when it is gone, else why it is not. `while_it_exits`: see
    processes.stop_process."""
    try:
        if stop_process(pid, create_time, timeout=timeout, while_it_exits=while_it_exits):
            return None
    except PermissionError as exc:
        return f"not allowed to stop pid {pid}: {exc.strerror or exc}"
    return f"pid {pid} survived SIGKILL"


def processes_of(instance: GpuInstance) -> list[tuple[int, float | None]]:
    """(pid, create time) of the instance's recorded process, and of one launched for it but not yet recorded
    (a start racing this stop), found by its tag. A start that reached `running` had recorded its process:
    no scan of the process table then (it reads the environment of every process on the machine)."""
    pids = [(instance.pid, instance.process_create_time)] if instance.pid else []
    if instance.loaded_at is None and instance.host_id:
        tagged = find_tagged(instance)
        if tagged and tagged != instance.pid:
            pids.append((tagged, create_time_of(tagged)))
    return pids


def fail(
    instance: GpuInstance,
    message: str,
    *,
    exit_code: int | None = None,
    expected=None,
    event_kind: str = Kind.FAILED,
) -> bool:
    """Mark the instance failed with the message and its log tail; no process is left behind (or the
    message says why one is)."""
    for pid, create_time in processes_of(instance):
        problem = stop_pid(pid, create_time, timeout=2)
        if problem:
            message = f"{message}; {problem}"
    tail = log_tail(instance.log_path)
    error = f"{message}\n--- last lines of the log ---\n{tail}" if tail else message
    logger.warning("instance %s failed: %s", instance.pk, message)
    return transition(
        instance,
        Status.FAILED,
        expected=expected or [Status.PENDING, Status.STARTING],
        event_kind=event_kind,
        detail=message,
        error=error,
        exit_code=exit_code,
        stopped_at=timezone.now(),
        lease_expires_at=None,
    )


def _unexpected(exc: Exception) -> str:
    return f"unexpected error: {type(exc).__name__}: {exc}"


def give_up(instance: GpuInstance, exc: Exception, **kwargs) -> None:
    """A load or resumed start that hit an unexpected error ends failed with it. The cause goes into the log
    first: if the database is what failed, the row cannot take it now, and the reconcile pass that settles
    the instance later names it from the log (not "the worker ... was lost")."""
    message = _unexpected(exc)
    note_failure(log_path_for(instance), message)
    try:
        fail(instance, message, **kwargs)
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            raise  # the caller's transaction went with the connection
        connection.close()  # a dropped connection: a new one may work at once
        try:
            fail(instance, message, **kwargs)
        except (OperationalError, InterfaceError):
            logger.exception("instance %s: the failure could not be recorded", instance.pk)


# --- unload --------------------------------------------------------------------------------------------


def unload_instance(instance_id: int, actor=None) -> None:
    """Stop the instance's process and mark it stopped. Idempotent: a stopped instance is left alone, so a
    database connection dropped on the way (a restart, pg_terminate_backend) is closed and the unload tried
    once more on a new one; it goes on from where the first try got."""
    try:
        _unload_instance(instance_id, actor)
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            raise  # the caller's transaction is lost with the connection: only the caller can start over
        logger.warning("unload of instance %s: database connection lost; trying again", instance_id)
        connection.close()
        _unload_instance(instance_id, actor)


def _unload_instance(instance_id: int, actor) -> None:
    instance = GpuInstance.objects.by_id(instance_id, "host")
    if instance is None:
        return
    try:
        _unload(instance, actor)
    except (OperationalError, InterfaceError):
        raise  # nothing can be recorded on a lost connection (unload_instance tries again)
    except Exception as exc:  # whatever went wrong, the instance does not stay `stopping`
        logger.exception("unload of instance %s failed", instance.pk)
        _unload_failed(instance, _unexpected(exc), actor)


def _unload(instance: GpuInstance, actor) -> None:
    if (
        instance.status == Status.RUNNING
        and instance.pid
        and not is_alive(instance.pid, instance.process_create_time)
    ):
        # It died before anybody asked it to stop: that is a crash, with its exit code (not restarted: it
        # was to stop anyway).
        record_crash(instance)
        return
    if instance.status in (Status.PENDING, Status.STARTING, Status.RUNNING):
        # Called without a request (e.g. the admin's kill): ask first, as a request would.
        transition(
            instance,
            Status.STOPPING,
            expected=[instance.status],
            event_kind=Kind.UNLOAD_REQUESTED,
            actor=actor,
        )
    if instance.status != Status.STOPPING:
        return

    def hold() -> None:
        # The stop may take STOP_TIMEOUT and then the SIGKILL's wait: hold the instance that long. Written
        # only when llama-server has not exited EXIT_GRACE after its SIGTERM (it usually takes a few
        # milliseconds; until then no reconcile pass counts the request's unload as lost).
        GpuInstance.objects.filter(pk=instance.pk, status=Status.STOPPING).update(
            lease_expires_at=lease_until(settings.STOP_TIMEOUT + 5)
        )

    problems = [
        problem
        for n, (pid, create_time) in enumerate(processes_of(instance))
        if (problem := stop_pid(pid, create_time, while_it_exits=hold if n == 0 else None))
    ]
    if problems:
        _unload_failed(instance, "could not stop llama-server: " + "; ".join(problems), actor)
        return
    code = (
        exit_code_of(instance.pid, instance.log_path, create_time=instance.process_create_time)
        if instance.pid
        else None
    )
    if transition(
        instance,
        Status.STOPPED,
        event_kind=Kind.UNLOADED,
        actor=actor,
        detail=f"exit code {code}" if code is not None else "",
        stopped_at=timezone.now(),
        exit_code=code,
        lease_expires_at=None,
    ):
        refresh_memory(instance.host.name)


def _unload_failed(instance: GpuInstance, message: str, actor) -> None:
    logger.error("instance %s: %s", instance.pk, message)
    if transition(
        instance,
        Status.FAILED,
        expected=[Status.STOPPING],
        event_kind=Kind.FAILED,
        actor=actor,
        detail=message,
        error=message,
        stopped_at=timezone.now(),
        lease_expires_at=None,
    ):
        refresh_memory(instance.host.name)


# --- crash ---------------------------------------------------------------------------------------------


def record_crash(instance: GpuInstance, expected=(Status.RUNNING,)) -> bool:
    """The instance's process is gone unasked: `crashed` with its exit code and the end of its log."""
    code = exit_code_of(instance.pid, instance.log_path)
    message = f"llama-server (pid {instance.pid}) exited unexpectedly" + (
        f" with code {code}{signal_note(code)}" if code is not None else ""
    )
    tail = log_tail(instance.log_path)
    if not transition(
        instance,
        Status.CRASHED,
        expected=expected,
        event_kind=Kind.CRASHED,
        detail=message,
        error=f"{message}\n--- last lines of the log ---\n{tail}" if tail else message,
        exit_code=code,
        stopped_at=timezone.now(),
    ):
        return False
    logger.warning("instance %s crashed: %s", instance.pk, message)
    refresh_memory(instance.host.name)
    return True


def refresh_memory(host_name: str) -> None:
    """Refresh the host's GPU figures now, so that pages show the change at once."""

    try:
        memory.refresh_host_memory(host_name)
    except Exception:  # a telemetry hiccup must not undo an unload
        logger.exception("memory refresh of %s failed", host_name)
