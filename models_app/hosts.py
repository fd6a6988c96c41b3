"""Hosts that went quiet. Work sent to a host whose worker does not answer must not hold GPUs forever: after
HOST_TIMEOUT_SECONDS without a heartbeat (a GPU refresh or a reconcile pass), its pending and stopping
instances fail, its GPUs become unavailable with the reason, and a HOST_LOST event says so. The check runs
from beat on the default queue (the lost host's own queue has nobody to take it)."""

import logging
from collections import Counter
from datetime import timedelta

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from gpus.models import Host
from gpus.services import clear_host_lost, mark_host_lost

from .events import record
from .lifecycle import last_change
from .models import GpuInstance, InstanceEvent
from .state import transition

logger = logging.getLogger(__name__)

Status = GpuInstance.Status
Kind = InstanceEvent.Kind


def lost_prefix(host: Host) -> str:
    return f"host {host.name} did not answer"


def lost_reason(host: Host) -> str:
    since = host.last_seen or host.created_at
    return f"{lost_prefix(host)} since {timezone.localtime(since):%H:%M}"


def check_hosts() -> dict[str, int]:
    """One pass over the hosts that have been silent past the timeout."""
    now = timezone.now()
    cutoff = now - timedelta(seconds=settings.HOST_TIMEOUT_SECONDS)
    done: Counter[str] = Counter()
    silent = Host.objects.filter(Q(last_seen__lt=cutoff) | Q(last_seen=None, created_at__lt=cutoff))
    for host in silent:
        reason = lost_reason(host)
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
        # The GPUs are marked once per silence, so that an admin's clearing sticks.
        since = host.last_seen or host.created_at
        marked = InstanceEvent.objects.filter(
            kind=Kind.HOST_LOST,
            instance=None,
            detail__startswith=f"{lost_prefix(host)} ",
            created_at__gte=since,
        )
        if not marked.exists():
            count = mark_host_lost(host, reason)
            record(Kind.HOST_LOST, detail=f"{reason}: {count} GPU(s) marked unavailable")
            logger.warning("%s: %d GPU(s) marked unavailable", reason, count)
            done["hosts"] += 1
    return dict(done)


def clear_host(host: Host, actor=None) -> int:
    """An admin clears a lost host's GPUs (it is back, or its GPUs are known to be free). Returns the GPUs
    cleared; the event records who did it."""
    count = clear_host_lost(host, lost_prefix(host))
    record(Kind.HOST_LOST, actor=actor, detail=f"host {host.name}: {count} GPU(s) cleared of the lost mark")
    return count
