"""Telemetry housekeeping and alert delivery. The periodic refresh itself is `models_app.tasks.refresh_host`:
it needs to know which processes belong to which instance, and `gpus` does not look at instances (it
evaluates the host's alert rules right after writing the rows)."""

import logging

import requests
from celery import shared_task
from django.conf import settings

from utilities.periodic import idempotent, once_per_period

from . import alerts, dispatch, notify, services
from .models import Alert

logger = logging.getLogger(__name__)


@shared_task(name="gpus.tasks.prune_samples", ignore_result=True)
@idempotent("deletes samples past the retention: a second run finds none left")
def prune_samples() -> int:
    return services.prune_samples()


@shared_task(name="gpus.tasks.evaluate_telemetry_alerts", ignore_result=True)
# Two passes at once race to open the same alert: the one-live-alert constraint keeps one, the other pass fails.
@once_per_period(lambda: settings.GPU_REFRESH_SECONDS)
def evaluate_telemetry_alerts() -> int:
    """Beat, default queue: telemetry failing on any host (a silent host cannot report itself)."""
    return len(alerts.evaluate_telemetry())


@shared_task(name="gpus.tasks.deliver_alert", ignore_result=True)
def deliver_alert(alert_id: int, event: str) -> int:
    """Fan out one fired/resolved alert: one task per webhook URL (each retried on its own) and one e-mail."""
    if not Alert.objects.filter(pk=alert_id).exists():
        return 0
    for index in range(len(settings.ALERT_WEBHOOK_URLS)):
        dispatch.send_alert_webhook(alert_id, event, index)
    if notify.email_configured():
        dispatch.send_alert_email(alert_id, event)
    return len(settings.ALERT_WEBHOOK_URLS)


@shared_task(
    name="gpus.tasks.post_alert_webhook",
    ignore_result=True,
    autoretry_for=(requests.RequestException,),
    retry_backoff=5,  # 5 s, 10 s, 20 s, … with jitter
    retry_backoff_max=600,
    retry_jitter=True,
    max_retries=8,
)
def post_alert_webhook(alert_id: int, event: str, url_index: int) -> int | None:
    alert = Alert.objects.select_related("rule", "host").filter(pk=alert_id).first()
    if alert is None or url_index >= len(settings.ALERT_WEBHOOK_URLS):
        return None
    return notify.post_webhook(settings.ALERT_WEBHOOK_URLS[url_index], notify.payload(alert, event))


@shared_task(
    name="gpus.tasks.email_alert",
    ignore_result=True,
    autoretry_for=(OSError,),
    retry_backoff=30,
    retry_backoff_max=1800,
    max_retries=5,
)
def email_alert(alert_id: int, event: str) -> int:
    alert = Alert.objects.select_related("rule", "host").filter(pk=alert_id).first()
    return notify.send_email(alert, event) if alert else 0
