"""Account events (failed logins, token and user changes) belong to the audit trail, which lives in
models_app (InstanceEvent). accounts imports no other app of ours, so it announces them with this signal
and models_app writes the row, in the same transaction as the change."""

from django.dispatch import Signal

# Sent with kind= (an InstanceEvent.Kind value), actor= (a user or None) and detail= (text).
account_event = Signal()

LOGIN_FAILED = "login_failed"
LOGIN_LOCKED = "login_locked"
TOKEN_CREATED = "token_created"
TOKEN_REVOKED = "token_revoked"
TOKEN_CHANGED = "token_changed"
USER_CHANGED = "user_changed"


def emit(kind: str, *, actor=None, detail: str = "") -> None:
    account_event.send(sender=None, kind=kind, actor=actor, detail=detail)
