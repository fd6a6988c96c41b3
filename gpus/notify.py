"""Alert delivery: the webhook body (Slack-compatible `text`, plus the alert as data) and the e-mail.
Called by the Celery tasks in gpus/tasks.py, which retry with backoff."""

import requests
from django.conf import settings
from django.core.mail import send_mail

from .models import Alert

WEBHOOK_TIMEOUT_SECONDS = 10


def alert_text(alert: Alert, event: str) -> str:
    marker = {"fired": "FIRING", "resolved": "RESOLVED"}.get(event, event.upper())
    return f"[{marker}] [{alert.rule.get_severity_display()}] {alert.rule.name}: {alert.message}"


def payload(alert: Alert, event: str) -> dict:
    def iso(moment):
        return moment.isoformat() if moment else None

    return {
        "text": alert_text(alert, event),
        "event": event,
        "alert": {
            "id": alert.pk,
            "rule": alert.rule.name,
            "kind": alert.rule.kind,
            "severity": alert.rule.severity,
            "status": alert.status,
            "subject": alert.subject,
            "message": alert.message,
            "value": alert.value,
            "host": alert.host.name if alert.host_id else None,
            "gpu_id": alert.gpu_id,
            "instance_id": alert.instance_id,
            "started_at": iso(alert.started_at),
            "fired_at": iso(alert.fired_at),
            "resolved_at": iso(alert.resolved_at),
        },
    }


def post_webhook(url: str, body: dict) -> int:
    """POST the JSON body; a non-2xx answer raises (the task retries it)."""
    response = requests.post(url, json=body, timeout=WEBHOOK_TIMEOUT_SECONDS)
    response.raise_for_status()
    return response.status_code


def email_configured() -> bool:
    """Recipients are set and Django can send: an SMTP host, or another backend (console, file, tests)."""
    smtp = settings.EMAIL_BACKEND == "django.core.mail.backends.smtp.EmailBackend"
    return bool(settings.ALERT_EMAILS) and (not smtp or bool(settings.EMAIL_HOST))


def send_email(alert: Alert, event: str) -> int:
    text = alert_text(alert, event)
    return send_mail(
        subject=f"LlamaController: {text[:150]}",
        message=f"{text}\n\nStarted {alert.started_at:%Y-%m-%d %H:%M:%S %Z}. Subject: {alert.subject}.",
        from_email=None,
        recipient_list=settings.ALERT_EMAILS,
    )
