from celery import shared_task

from . import usage


@shared_task(name="gateway.tasks.prune_usage", ignore_result=True)
def prune_usage() -> int:
    return usage.prune()
