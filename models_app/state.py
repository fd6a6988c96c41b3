"""Instance statuses as data: the named sets that code asks about, the table of legal moves, and transition(),
the one way a status changes.

Each transition is a compare-and-set on the status column, so two workers (or a worker and a request) never
both win; leaving the active statuses releases the GPUs in the same transaction, and every transition writes
an event. An instance that leaves them keeps no memory figure: its process is gone, so "342 MiB" on a stopped
row would be a figure of nothing (the samples keep the history)."""

from collections.abc import Iterable

from django.db import transaction

from utilities.dbutil import update

from .events import record
from .models import GpuInstance, InstanceGpu

Status = GpuInstance.Status

# --- named sets -----------------------------------------------------------------------------------------

# Holds its GPUs and port. Defined on the model, whose is_active and constraints use it.
ACTIVE = frozenset(GpuInstance.ACTIVE_STATUSES)
# A load under way or done: what a request for the model can use or wait for.
LOADING_OR_RUNNING = frozenset({Status.PENDING, Status.STARTING, Status.RUNNING})
# Moving by itself (a worker is on it): pages poll until it settles.
IN_TRANSITION = frozenset({Status.PENDING, Status.STARTING, Status.STOPPING})
# Over: no process, no GPUs. Only a crash may start again (a restart on crash).
ENDED = frozenset({Status.STOPPED, Status.CRASHED, Status.FAILED})

# --- the table ----------------------------------------------------------------------------------------

# Every legal move, from → to. transition() refuses any other (IllegalTransition: a bug in the caller).
LEGAL_TRANSITIONS: dict[str, frozenset[str]] = {
    Status.PENDING: frozenset(
        {
            Status.STARTING,  # a worker takes the load (or reconcile finds its process by its tag)
            Status.STOPPING,  # an unload or switch came first
            Status.FAILED,  # the load could not be queued, no worker took it, or its host went down
        }
    ),
    Status.STARTING: frozenset(
        {
            Status.RUNNING,  # healthy
            Status.STOPPING,  # an unload or switch while it loads
            Status.FAILED,  # the load failed or timed out
            Status.PENDING,  # its worker died before llama-server started: loaded again
            Status.UNKNOWN,  # its host went down
        }
    ),
    Status.RUNNING: frozenset({Status.STOPPING, Status.CRASHED, Status.UNKNOWN}),
    Status.STOPPING: frozenset({Status.STOPPED, Status.FAILED}),  # failed: it could not be stopped
    Status.UNKNOWN: frozenset(
        {
            Status.RUNNING,  # its host answers and the process outlived the silence
            Status.STARTING,  # the same, while it was loading
            Status.CRASHED,  # the process died meanwhile
            Status.FAILED,  # died while loading, or an admin retired the host
        }
    ),
    Status.CRASHED: frozenset({Status.PENDING}),  # restart on crash
    Status.STOPPED: frozenset(),
    Status.FAILED: frozenset(),
}


class IllegalTransition(Exception):
    """A move that LEGAL_TRANSITIONS does not allow was asked for: a programming error, never a lost race."""


def sources_of(status: str) -> frozenset[str]:
    """Every status with a legal move to `status`."""
    return frozenset(source for source, targets in LEGAL_TRANSITIONS.items() if status in targets)


def transition(
    instance: GpuInstance,
    new_status: str,
    *,
    expected: Iterable[str] | None = None,
    event_kind: str,
    actor=None,
    detail: str = "",
    reason: str = "",
    **fields,
) -> bool:
    """Move `instance` to `new_status` if its status is one of `expected` (default: every legal source of
    `new_status`); set `fields` too (`reason`: the event's rule code). Returns False (and changes nothing) when another party moved it first.
    Raises IllegalTransition when `expected` names a status with no legal move to `new_status`. Updates
    `instance` in memory."""
    legal = sources_of(new_status)
    expected = legal if expected is None else frozenset(expected)
    if not expected or not expected <= legal:
        illegal = ", ".join(sorted(str(status) for status in expected - legal)) or "nothing"
        raise IllegalTransition(f"{illegal} → {new_status} is not in state.LEGAL_TRANSITIONS")
    if new_status not in ACTIVE:
        fields = {**NO_MEMORY, **fields}
    # Plain SQL (utilities.dbutil): met cold, as every load and unload meets its transitions, the ORM took
    # more than twice as long to build these statements as the database took to run them.
    with transaction.atomic():
        changed = update(
            GpuInstance, {"status": new_status, **fields}, {"pk": instance.pk, "status__in": sorted(expected)}
        )
        if changed != 1:
            return False
        if new_status not in ACTIVE:
            update(InstanceGpu, {"active": False}, {"instance_id": instance.pk, "active": True})
        record(event_kind, instance=instance, actor=actor, detail=detail, reason=reason)
    instance.status = new_status
    for name, value in fields.items():
        setattr(instance, name, value)
    return True


# What an inactive instance shows: no figure (memory_total_mb stays: the size of its GPUs, not a usage).
NO_MEMORY = {
    "memory_used_mb": None,
    "memory_source": GpuInstance.MemorySource.NONE,
    "memory_updated_at": None,
}


def last_change(instance: GpuInstance, kind: str | None = None):
    """When the instance last changed (its newest event, of `kind` if given)."""
    events = instance.events.filter(kind=kind) if kind else instance.events.all()
    event = events.order_by("-created_at", "-id").first()
    return event.created_at if event else instance.requested_at
