"""Instance status transitions. Each one is a compare-and-set on the status column, so two workers (or a
worker and a request) never both win; leaving the active statuses releases the GPUs in the same
transaction, and every transition writes an event."""

from collections.abc import Iterable

from django.db import transaction

from .events import record
from .models import GpuInstance, InstanceGpu

Status = GpuInstance.Status


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
