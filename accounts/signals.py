"""Failed logins and lockouts, wherever they happen (login page, admin login), join the audit trail.
django-axes counts them and decides the lock; these receivers only announce them (see audit.py)."""

from axes.signals import user_locked_out
from django.conf import settings
from django.contrib.auth.signals import user_login_failed
from django.dispatch import receiver

from . import audit
from .throttle import client_ip


def _refused_while_locked(request) -> bool:
    # axes' backend flags a request it refused because the lock was already on; the handler then counts
    # nothing (AXES_RESET_COOL_OFF_ON_FAILURE_DURING_LOCKOUT=False) and leaves the failure count unset.
    # Such refusals are not audited one by one, so a stranger hammering the form cannot flood the trail.
    return bool(getattr(request, "axes_locked_out", False)) and (
        getattr(request, "axes_failures_since_start", None) is None
    )


def _source(request) -> str:
    address = getattr(request, "axes_ip_address", None) or (client_ip(request) if request else None)
    return f" from {address}" if address else ""


def _audit_failure(request, username) -> None:
    """LOGIN_FAILED once per request, whichever receiver (ours or axes') runs first."""
    if request is not None:
        if getattr(request, "_llamacontroller_failure_audited", False):
            return
        request._llamacontroller_failure_audited = True
    audit.emit(audit.LOGIN_FAILED, detail=f"username {str(username or '')[:150]!r}{_source(request)}")


@receiver(user_login_failed, dispatch_uid="accounts.audit_failed_login")
def audit_failed_login(sender, credentials, request=None, **kwargs):
    if request is not None and _refused_while_locked(request):
        return
    _audit_failure(request, credentials.get("username", ""))


@receiver(user_locked_out, dispatch_uid="accounts.audit_lockout")
def audit_lockout(sender, request, username, ip_address, **kwargs):
    if _refused_while_locked(request):
        return
    _audit_failure(request, username)  # the failure that locked comes first in the trail
    minutes = max(1, round(settings.AXES_COOLOFF_TIME.total_seconds() / 60))
    audit.emit(
        audit.LOGIN_LOCKED,
        detail=f"username {str(username or '')[:150]!r} locked{_source(request)} for {minutes} min",
    )
