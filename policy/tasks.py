from celery import shared_task

from utilities.periodic import idempotent

from . import drain


@shared_task(name="policy.tasks.drain_reservations", ignore_result=True)
@idempotent(
    "each owner is told once (a DrainNotice row per reservation and instance); unloading twice is a no-op"
)
def drain_reservations() -> int:
    """Beat, on the default queue: tell owners of instances on soon-reserved GPUs, unload them at the start."""
    told, unloaded = drain.drain()
    return told + unloaded
