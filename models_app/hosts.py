"""Hosts that went down. A host whose worker sent no heartbeat for HOST_TIMEOUT_SECONDS is down (see
models_app/cluster.py): its GPUs become unavailable with the reason, its running and starting instances become
`unknown` (the processes may well be alive: they run in their own sessions), its pending and stopping instances
fail, and a HOST_LOST event says so. The check runs from beat on the default queue (the lost host's own queue
has nobody to take it). When the host answers again, its reconcile pass settles the unknown instances.

The same pass watches the work of the hosts that are up: a load no worker took is sent again (10 s, 20 s,
40 s) and then given up, and an unload still `stopping` long after the host's own pass would have finished it
is given up, each naming the host. Neither depends on the host's queue being read."""

import logging
from collections import Counter
from datetime import timedelta

from django.utils import timezone

from gpus.models import Host, alive_cutoff
from gpus.services import clear_host_lost, mark_host_lost

from . import reconcile
from .events import record
from .models import GpuInstance, InstanceEvent
from .state import last_change, transition

logger = logging.getLogger(__name__)

Status = GpuInstance.Status
Kind = InstanceEvent.Kind


def check_hosts() -> dict[str, int]:
    """One pass over the hosts that are down, then over the untaken work of those that are up."""
    done = _check_down_hosts()
    for outcome, count in check_untaken().items():
        done[outcome] = done.get(outcome, 0) + count
    return done


def check_untaken() -> dict[str, int]:
    """Loads that no worker took are sent again or given up; unloads that nobody finished are given up."""
    done: Counter[str] = Counter()
    never = timezone.now() - timedelta(days=36500)  # a host registered without a worker's claim
    waiting = GpuInstance.objects.filter(
        host__in=Host.objects.up(), status__in=[Status.PENDING, Status.STOPPING]
    ).select_related("host", "model")
    for instance in waiting:
        started = instance.host.worker_started_at or never
        if instance.status == Status.PENDING:
            outcome = reconcile.resend_pending(instance, worker_started_at=started)
        else:
            outcome = reconcile.give_up_unload(instance, worker_started_at=started)
        if outcome:
            done[outcome] += 1
    return dict(done)


def _check_down_hosts() -> dict[str, int]:
    now = timezone.now()
    cutoff = alive_cutoff()
    done: Counter[str] = Counter()
    for host in Host.objects.down():
        reason = host.down_reason()
        waiting = GpuInstance.objects.filter(host=host, status__in=[Status.PENDING, Status.STOPPING])
        for instance in waiting:
            if last_change(instance) >= cutoff:
                continue  # asked for after the host went quiet: it gets its own full timeout
            if transition(
                instance,
                Status.FAILED,
                expected=[Status.PENDING, Status.STOPPING],
                event_kind=Kind.HOST_LOST,
                detail=reason,
                error=reason,
                stopped_at=now,
                lease_expires_at=None,
            ):
                logger.warning("instance %s failed: %s", instance.pk, reason)
                done["failed"] += 1
        live = GpuInstance.objects.filter(host=host, status__in=[Status.RUNNING, Status.STARTING])
        for instance in live:
            if transition(
                instance,
                Status.UNKNOWN,
                event_kind=Kind.HOST_LOST,
                detail=f"{reason}: its llama-server may still run; it is checked when the host answers",
                lease_expires_at=None,
            ):
                logger.warning("instance %s unknown: %s", instance.pk, reason)
                done["unknown"] += 1
        # The GPUs are marked once per silence, so that an admin's clearing sticks.
        since = host.last_seen or host.created_at
        if host.gpus_marked_at is None or host.gpus_marked_at < since:
            count = mark_host_lost(host, reason)
            record(Kind.HOST_GPUS_MARKED, detail=f"{reason}: {count} GPU(s) marked unavailable")
            logger.warning("%s: %d GPU(s) marked unavailable", reason, count)
            done["hosts"] += 1
    return dict(done)


def clear_host(host: Host, actor=None) -> int:
    """An admin clears a lost host's GPUs (it is back, or its GPUs are known to be free). Returns the GPUs
    cleared; the event records who did it."""
    count = clear_host_lost(host)
    record(Kind.HOST_LOST, actor=actor, detail=f"host {host.name}: {count} GPU(s) cleared of the lost mark")
    return count


def retire_host(host: Host, actor=None) -> int:
    """An admin writes off a down host that will not come back: its unknown instances fail (their GPUs are
    released; if the machine ever returns, its worker reports their processes as orphans). A host that is up
    is refused. Returns the instances written off."""
    if host.is_up:
        raise ValueError(
            f"host {host.name} is up (heartbeat at {timezone.localtime(host.last_seen):%H:%M:%S})"
        )
    by = getattr(actor, "username", None) or "the system"
    reason = f"host {host.name} retired by {by} ({host.down_reason()})"
    count = 0
    for instance in GpuInstance.objects.filter(host=host, status=Status.UNKNOWN):
        if transition(
            instance,
            Status.FAILED,
            expected=[Status.UNKNOWN],
            event_kind=Kind.HOST_LOST,
            actor=actor,
            detail=reason,
            error=reason,
            stopped_at=timezone.now(),
        ):
            count += 1
    record(Kind.HOST_LOST, actor=actor, detail=f"{reason}: {count} unknown instance(s) written off")
    return count
