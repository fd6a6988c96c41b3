"""Instance status transitions. Each one is a compare-and-set on the status column, so two workers (or a
worker and a request) never both win; leaving the active statuses releases the GPUs in the same
transaction, and every transition writes an event. An instance that leaves them keeps no memory figure: its
process is gone, so "342 MiB" on a stopped row would be a figure of nothing (the samples keep the history)."""

from collections.abc import Iterable

from django.db import transaction

from .events import record
from .models import GpuInstance, InstanceGpu

Status = GpuInstance.Status

# What an inactive instance shows: no figure (memory_total_mb stays: the size of its GPUs, not a usage).
NO_MEMORY = {
    "memory_used_mb": None,
    "memory_source": GpuInstance.MemorySource.NONE,
    "memory_updated_at": None,
}


def transition(
    instance: GpuInstance,
    new_status: str,
    *,
    expected: Iterable[str],
    event_kind: str,
    actor=None,
    detail: str = "",
    **fields,
) -> bool:
    """Move `instance` to `new_status` if its status is one of `expected`; set `fields` too.
    Returns False (and changes nothing) when another party moved it first. Updates `instance` in memory."""
    expected = list(expected)
    if new_status not in GpuInstance.ACTIVE_STATUSES:
        fields = {**NO_MEMORY, **fields}
    with transaction.atomic():
        changed = GpuInstance.objects.filter(pk=instance.pk, status__in=expected).update(
            status=new_status, **fields
        )
        if changed != 1:
            return False
        if new_status not in GpuInstance.ACTIVE_STATUSES:
            InstanceGpu.objects.filter(instance_id=instance.pk, active=True).update(active=False)
        record(event_kind, instance=instance, actor=actor, detail=detail)
    instance.status = new_status
    for name, value in fields.items():
        setattr(instance, name, value)
    return True
