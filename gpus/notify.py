"""Alert delivery: the webhook body (Slack-compatible `text`, plus the alert as data) and the e-mail.
Called by the Celery tasks in gpus/tasks.py, which retry with backoff.

Alert messages carry what others chose: process names, model names. They reach each channel as text, never
as its markup: Slack reads `<!channel>`, `<@U123>` and `<url|label>` as mentions and links, so the
webhook's `text` has `&`, `<` and `>` escaped as Slack asks; line breaks and other control characters
become spaces everywhere (a name cannot start a line that looks like another alert, or break the e-mail's
subject header). The webhook's `alert` object keeps the values as data (JSON, unescaped)."""

import re

import requests
from django.conf import settings
from django.core.mail import send_mail

from .models import Alert

WEBHOOK_TIMEOUT_SECONDS = 10


# C0 and C1 controls, DEL, and Unicode's line and paragraph separators.
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def plain(value) -> str:
    """One line of text: control characters (line breaks among them) become spaces."""
    return _CONTROL.sub(" ", str(value))


def slack_escape(text: str) -> str:
    """Slack's own rule for text that is not markup: only &, < and > are escaped."""
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def alert_text(alert: Alert, event: str) -> str:
    """The alert in one plain line (e-mail); the webhook escapes it for Slack."""
    marker = {"fired": "FIRING", "resolved": "RESOLVED"}.get(event, event.upper())
    return plain(f"[{marker}] [{alert.rule.get_severity_display()}] {alert.rule.name}: {alert.message}")


def payload(alert: Alert, event: str) -> dict:
    def iso(moment):
        return moment.isoformat() if moment else None

    return {
        "text": slack_escape(alert_text(alert, event)),
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
        message=f"{text}\n\nStarted {alert.started_at:%Y-%m-%d %H:%M:%S %Z}. Subject: {plain(alert.subject)}.",
        from_email=None,
        recipient_list=settings.ALERT_EMAILS,
    )
