from celery import shared_task

from utilities.periodic import idempotent

from . import usage


@shared_task(name="gateway.tasks.prune_usage", ignore_result=True)
@idempotent("deletes records past the retention: a second run finds none left")
def prune_usage() -> int:
    return usage.prune()
