"""The one place models_app queues Celery work, by the names models_app/tasks.py declares (sent through
utilities/dispatch.py): nothing imports tasks.py to queue a task. Each sender says whether it sends now or
when the transaction commits (`at_once`), and what a broker that refuses costs.

Two kinds of sender for the instance tasks: a user's command (services) retries the broker briefly, and a load
the broker refuses fails its instance; a reconcile pass sends again with no retries and lets the error rise
(its next pass sends again)."""

import logging

from utilities.dispatch import send

from .models import GpuInstance, InstanceEvent
from .state import transition

logger = logging.getLogger(__name__)

Status = GpuInstance.Status
Kind = InstanceEvent.Kind

LOAD_MODEL = "models_app.tasks.load_model"
RESUME_START = "models_app.tasks.resume_start"
UNLOAD_MODEL = "models_app.tasks.unload_model"
KILL_ORPHAN = "models_app.tasks.kill_orphan"
RECONCILE_HOST = "models_app.tasks.reconcile_host"
CHECK_MODEL_FILES = "models_app.tasks.check_model_files"
REFRESH_HOST = "models_app.tasks.refresh_host"
SCAN_MODEL_FOLDERS = "models_app.tasks.scan_model_folders"

NAMES = (
    LOAD_MODEL, RESUME_START, UNLOAD_MODEL, KILL_ORPHAN, RECONCILE_HOST, CHECK_MODEL_FILES, REFRESH_HOST,
    SCAN_MODEL_FOLDERS,
)  # fmt: skip

# A command's send: the broker went away between the ping (services.check_broker) and the commit.
COMMAND_RETRY = {"retry": True, "retry_policy": {"max_retries": 2, "interval_start": 0.2}}


# --- a user's command (services) ------------------------------------------------------------------------


def send_load(instance: GpuInstance, *, at_once: bool) -> None:
    """The load a command asked for. Refused by the broker: the instance fails with "could not queue the
    load: …"."""
    instance_id, queue = instance.pk, instance.host.queue

    def refused(exc: Exception) -> None:
        logger.exception("could not queue %s%s", LOAD_MODEL, [instance_id])
        failed = GpuInstance.objects.filter(pk=instance_id).first()
        if failed is not None:
            message = f"could not queue the load: {exc}"
            transition(
                failed, Status.FAILED, expected=[Status.PENDING], event_kind=Kind.FAILED,
                detail=message, error=message,
            )  # fmt: skip

    send(LOAD_MODEL, [instance_id], queue=queue, at_once=at_once, on_error=refused, **COMMAND_RETRY)


def send_unload(instance: GpuInstance, actor_id: int | None, *, at_once: bool) -> None:
    """The unload a command asked for. Refused by the broker: logged; the reconcile pass redoes it (the
    instance stays `stopping`)."""
    args = [instance.pk, actor_id]

    def refused(exc: Exception) -> None:
        logger.exception("could not queue %s%s", UNLOAD_MODEL, args)

    send(UNLOAD_MODEL, args, queue=instance.host.queue, at_once=at_once, on_error=refused, **COMMAND_RETRY)


def send_kill_orphan(host, pid: int, actor_id: int | None, gpu_id: int, *, at_once: bool = True) -> None:
    """The kill of an orphan process; a broker error is the caller's (a refusal to the user)."""
    send(KILL_ORPHAN, [host.name, pid, actor_id, gpu_id], queue=host.queue, at_once=at_once)


# --- a reconcile pass sending again ------------------------------------------------------------------------


def send_again(
    name: str, instance: GpuInstance, *, at_once: bool = False, countdown: float | None = None
) -> None:
    """Send one of LOAD_MODEL, RESUME_START, UNLOAD_MODEL for `instance` again (a reconcile pass), on its
    host's queue. No broker retries; an error rises (the next pass sends again)."""
    assert name in (LOAD_MODEL, RESUME_START, UNLOAD_MODEL), name
    options = {} if countdown is None else {"countdown": countdown}
    send(name, [instance.pk], queue=instance.host.queue, at_once=at_once, **options)


# --- hosts ----------------------------------------------------------------------------------------------


def send_reconcile(host, *, at_once: bool = True) -> None:
    """One reconcile pass on `host`'s queue (a host that answers again: now rather than at its turn)."""
    send(RECONCILE_HOST, [host.name], queue=host.queue, at_once=at_once)


def send_model_file_checks(hosts, expires: float, *, at_once: bool = True) -> None:
    """`check_model_files` to each host's queue. A broker that is down only delays the report until the next
    reconcile pass: logged, never raised."""
    for host in hosts:

        def refused(exc: Exception, name=host.name) -> None:
            logger.error("could not ask %s to check the model files", name, exc_info=exc)

        send(
            CHECK_MODEL_FILES, [host.name], queue=host.queue, expires=expires, at_once=at_once,
            on_error=refused, retry=True, retry_policy={"max_retries": 1, "interval_start": 0.2},
        )  # fmt: skip


def send_folder_scans(hosts, expires: float) -> list[str]:
    """`scan_model_folders` to each host's queue now (the Add a model page's Rescan). Returns the names of the
    hosts the broker refused (logged; the page says so), never raises."""
    refused_hosts = []
    for host in hosts:

        def refused(exc: Exception, name=host.name) -> None:
            logger.error("could not ask %s to scan its model folders", name, exc_info=exc)
            refused_hosts.append(name)

        send(
            SCAN_MODEL_FOLDERS, [host.name], queue=host.queue, expires=expires, at_once=True, on_error=refused
        )
    return refused_hosts


def fan_out(name: str, hosts, expires: float) -> int:
    """The beat dispatchers: task `name` (REFRESH_HOST, RECONCILE_HOST, SCAN_MODEL_FOLDERS) to each host's queue now, expiring
    after `expires` seconds. The number of hosts."""
    for host in hosts:
        send(name, [host.name], queue=host.queue, expires=expires, at_once=True)
    return len(hosts)
