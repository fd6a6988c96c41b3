"""The one place gpus queues Celery work: alert deliveries, by the names gpus/tasks.py declares
(utilities/dispatch.py sends them)."""

from utilities.dispatch import send

DELIVER_ALERT = "gpus.tasks.deliver_alert"
POST_ALERT_WEBHOOK = "gpus.tasks.post_alert_webhook"
EMAIL_ALERT = "gpus.tasks.email_alert"

NAMES = (DELIVER_ALERT, POST_ALERT_WEBHOOK, EMAIL_ALERT)


def send_alert_delivery(alert_id: int, event: str) -> None:
    """When the evaluation commits. Robust: a broker that is down loses this delivery (logged), never the
    evaluation."""
    send(DELIVER_ALERT, [alert_id, event], at_once=False, robust=True)


def send_alert_webhook(alert_id: int, event: str, url_index: int) -> None:
    """Now, on the default queue: one task per webhook URL, each retried on its own by the task."""
    send(POST_ALERT_WEBHOOK, [alert_id, event, url_index], at_once=True)


def send_alert_email(alert_id: int, event: str) -> None:
    """Now, on the default queue."""
    send(EMAIL_ALERT, [alert_id, event], at_once=True)
