"""Telemetry housekeeping. The periodic refresh itself is `models_app.tasks.refresh_host`: it needs to know
which processes belong to which instance, and `gpus` does not look at instances."""

from celery import shared_task

from . import services


@shared_task(name="gpus.tasks.prune_samples", ignore_result=True)
def prune_samples() -> int:
    return services.prune_samples()
