"""Loading an instance, as the worker of its host runs it (tasks.py): take the pending instance to `starting`,
start llama-server (launch.py) and see it healthy, then `running`; a start whose worker died is resumed. Every
status change goes through state.transition(); a load that fails or is cancelled ends through stop.py."""

import logging
import time

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from utilities.dbutil import read

from . import memory
from .events import record
from .launch import Cancelled, Launched, start_and_wait, starting_lease, wait_until_healthy
from .lease import lease_until
from .models import GpuInstance, InstanceEvent, InstanceGpu
from .processes import StartError
from .state import last_change, transition
from .stop import fail, give_up, stop_pid, unload_instance

logger = logging.getLogger(__name__)

Status = GpuInstance.Status
Kind = InstanceEvent.Kind


def load_instance(instance_id: int) -> None:
    """Start llama-server for a pending instance and see it healthy. Idempotent: an instance that is not
    pending (already started, running, or stopped) is left alone."""
    instance = GpuInstance.objects.by_id(instance_id, "model", "host")
    if instance is None or instance.status != Status.PENDING:
        return
    try:
        _load(instance)
    except Exception as exc:  # whatever went wrong, the instance ends in a definite state
        logger.exception("load of instance %s failed", instance.pk)
        give_up(instance, exc)


def _load(instance: GpuInstance) -> None:
    # A switch hands the GPUs over while the old instances are still stopping: stop them first, holding a
    # lease on the new one for as long as that may take.
    old_ones = _stopping_on_its_gpus(instance)
    if old_ones:
        GpuInstance.objects.filter(pk=instance.pk, status=Status.PENDING).update(
            lease_expires_at=lease_until(len(old_ones) * (settings.STOP_TIMEOUT + 10))
        )
    for old in old_ones:
        unload_instance(old)
    where = f"{instance.host.name} GPU {instance.gpu_ids}"
    if not transition(
        instance, Status.STARTING, expected=[Status.PENDING], event_kind=Kind.STARTED, detail=f"on {where}",
        lease_expires_at=starting_lease(), waiting_for="",
    ):  # fmt: skip
        return
    try:
        start_and_wait(instance)
    except Cancelled as cancelled:
        _finish_cancelled(instance, cancelled.launched)
        return
    except StartError as exc:
        fail(instance, str(exc), exit_code=exc.exit_code)
        return
    _mark_running(instance, detail=f"pid {instance.pid}, port {instance.port}")


def _stopping_on_its_gpus(instance: GpuInstance) -> list[int]:
    """The other instances still stopping on the GPUs this one holds, oldest request first. One plain
    statement (utilities.dbutil.read): every load asks, and it usually finds nothing."""
    rows = read(
        "SELECT DISTINCT {i.id}, {i.requested_at} FROM {a} "
        "INNER JOIN {b} ON {b.gpu} = {a.gpu} INNER JOIN {i} ON {i.id} = {b.instance} "
        "WHERE {a.instance} = %s AND {b.instance} <> %s AND {i.status} = %s "
        "ORDER BY {i.requested_at}, {i.id}",
        {"a": InstanceGpu, "b": InstanceGpu, "i": GpuInstance},
        [instance.pk, instance.pk, Status.STOPPING],
    )
    return [pk for pk, _ in rows]


def resume_start(instance_id: int) -> None:
    """Finish a start whose worker died: the process (adopted) is waited for until healthy."""
    instance = GpuInstance.objects.select_related("model", "host").filter(pk=instance_id).first()
    if instance is None or instance.status != Status.STARTING or not instance.pid:
        return
    try:
        remaining = settings.LOAD_TIMEOUT - seconds_since_start(instance)
        wait_until_healthy(instance, time.monotonic() + max(remaining, 1.0))
    except Cancelled:
        _finish_cancelled(instance)
        return
    except StartError as exc:
        fail(instance, str(exc), exit_code=exc.exit_code, expected=[Status.STARTING])
        return
    except Exception as exc:
        logger.exception("resumed start of instance %s failed", instance.pk)
        give_up(instance, exc, expected=[Status.STARTING])
        return
    _mark_running(
        instance, detail=f"pid {instance.pid}, port {instance.port} (adopted after a worker restart)"
    )


def seconds_since_start(instance: GpuInstance) -> float:
    return (timezone.now() - last_change(instance, Kind.STARTED)).total_seconds()


def adopt_running(instance: GpuInstance) -> None:
    """A start whose worker was lost, found healthy: it runs. An ADOPTED event says so, as every adoption's
    does (one found still loading is adopted first and healthy later)."""
    _mark_running(
        instance,
        detail=f"pid {instance.pid}, port {instance.port} (adopted: its worker was lost)",
        adopted=f"pid {instance.pid} found healthy: its worker was lost",
    )


def _mark_running(instance: GpuInstance, *, detail: str, adopted: str = "") -> None:
    """`starting` -> `running`; `adopted`: the detail of an ADOPTED event written before, in one transaction
    (a load's own transition is a transaction by itself: no savepoint in another one)."""

    def to_running() -> bool:
        return transition(
            instance,
            Status.RUNNING,
            expected=[Status.STARTING],
            event_kind=Kind.HEALTHY,
            detail=detail,
            loaded_at=timezone.now(),
            error="",
            lease_expires_at=None,
        )

    if adopted:
        with transaction.atomic():
            record(Kind.ADOPTED, instance=instance, detail=adopted)
            running = to_running()
            if not running:
                transaction.set_rollback(True)  # not adopted after all: somebody moved it first
    else:
        running = to_running()
    if not running:
        _finish_cancelled(instance)
        return
    try:
        memory.measure_after_load(instance)
    except Exception:  # the figure is a nicety: the model is loaded whatever the GPU query does
        logger.exception("post-load memory query failed for instance %s", instance.pk)


def _finish_cancelled(instance: GpuInstance, launched: Launched | None = None) -> None:
    """The instance was asked to stop while starting: finish that stop here. `launched`: a process this
    start launched but could not record (the unload had already run): nobody else will stop it."""
    instance.refresh_from_db()
    if launched and launched.pid != instance.pid:
        problem = stop_pid(launched.pid, launched.create_time, timeout=2)
        if problem:
            logger.error("instance %s: %s", instance.pk, problem)
    if instance.status == Status.STOPPING:
        unload_instance(instance.pk)
    elif instance.pid and not instance.is_active:
        stop_pid(instance.pid, instance.process_create_time, timeout=2)
