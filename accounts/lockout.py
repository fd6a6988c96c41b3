"""Account lockout: after settings.LOGIN_MAX_FAILURES failed logins within LOGIN_LOCKOUT_SECONDS, the
username is locked until the lockout window has passed since the failure that locked it. While locked,
even the right password is refused, and refused attempts are not counted (the lock does not grow)."""

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from . import audit
from .models import LoginFailure


def _window_start() -> datetime:
    return timezone.now() - timedelta(seconds=settings.LOGIN_LOCKOUT_SECONDS)


def locked_until(username: str) -> datetime | None:
    """When the lock on `username` ends, or None when it is not locked."""
    if not username:
        return None
    recent = list(
        LoginFailure.objects.filter(username__iexact=username, created_at__gte=_window_start())
        .order_by("-created_at")
        .values_list("created_at", flat=True)[: settings.LOGIN_MAX_FAILURES]
    )
    if len(recent) < settings.LOGIN_MAX_FAILURES:
        return None
    # The lock starts at the failure that reached the limit: the oldest of the last MAX failures.
    return recent[-1] + timedelta(seconds=settings.LOGIN_LOCKOUT_SECONDS)


def record_failure(username: str, ip_address: str | None) -> None:
    """Count one failed login; write LOGIN_FAILED, and LOGIN_LOCKED when this failure locks the account."""
    username = (username or "")[:150]
    LoginFailure.objects.create(username=username, ip_address=ip_address or None)
    source = f" from {ip_address}" if ip_address else ""
    audit.emit(audit.LOGIN_FAILED, detail=f"username {username!r}{source}")
    until = locked_until(username)
    if until is not None:
        audit.emit(
            audit.LOGIN_LOCKED,
            detail=f"username {username!r} locked until {until:%Y-%m-%d %H:%M:%S %Z}",
        )


def clear_failures(username: str) -> None:
    LoginFailure.objects.filter(username__iexact=username).delete()


def client_ip(request) -> str | None:
    # REMOTE_ADDR only: X-Forwarded-For is client-controlled unless a trusted proxy sets it.
    return request.META.get("REMOTE_ADDR") if request is not None else None
