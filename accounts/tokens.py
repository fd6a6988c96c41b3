"""Issuing and revoking API tokens, with the audit events, for the Tokens page and the API alike."""

from datetime import timedelta

from django.db import transaction
from django.utils import timezone

from . import audit
from .models import ApiToken, hash_token

LAST_USED_RESOLUTION = timedelta(seconds=60)


class TokenRejected(Exception):
    """A presented token that does not authenticate. `reason`: "unknown", "revoked", "expired" or
    "inactive" (its user); each caller words it in its own API's style."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def check(raw: str) -> ApiToken:
    """The usable token with this raw value, its user loaded, or TokenRejected. Records the use to the
    minute: a write on every request would cost more than it tells. One check for the REST API, the
    gateway and /metrics."""
    token = ApiToken.objects.select_related("user").filter(token_hash=hash_token(raw)).first()
    if token is None:
        raise TokenRejected("unknown")
    if token.revoked_at is not None:
        raise TokenRejected("revoked")
    now = timezone.now()
    if token.expires_at is not None and token.expires_at <= now:
        raise TokenRejected("expired")
    if not token.user.is_active:
        raise TokenRejected("inactive")
    if token.last_used_at is None or now - token.last_used_at > LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=token.pk).update(last_used_at=now)
    return token


def issue(*, user, name: str, expires_at=None, actor=None) -> tuple[ApiToken, str]:
    """A new token for `user` (issued by `actor`, default the user); returns the row and the raw token,
    which is never stored."""
    with transaction.atomic():
        token, raw = ApiToken.issue(user, name, expires_at=expires_at)
        expiry = f", expires {expires_at:%Y-%m-%d %H:%M %Z}" if expires_at else ", no expiry"
        detail = f"token {name!r} ({token.hint}…) for {user.get_username()}{expiry}"
        audit.emit(audit.TOKEN_CREATED, actor=actor or user, detail=detail)
    return token, raw


def revoke(*, token: ApiToken, actor) -> bool:
    """Revoke once; False when it was already revoked (nothing is written then)."""
    with transaction.atomic():
        changed = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(
            revoked_at=timezone.now()
        )
        if changed:
            audit.emit(
                audit.TOKEN_REVOKED,
                actor=actor,
                detail=f"token {token.name!r} ({token.hint}…) of {token.user.get_username()}",
            )
    token.refresh_from_db(fields=["revoked_at"])
    return bool(changed)


def rename(*, token: ApiToken, name: str, actor) -> bool:
    """The one thing that may change on an issued token; its user and expiry are fixed at issue."""
    old = ApiToken.objects.filter(pk=token.pk).values_list("name", flat=True).first()
    if old is None or old == name:
        return False
    with transaction.atomic():
        ApiToken.objects.filter(pk=token.pk).update(name=name)
        audit.emit(
            audit.TOKEN_CHANGED,
            actor=actor,
            detail=f"token {old!r} ({token.hint}…) of {token.user.get_username()} renamed to {name!r}",
        )
    token.name = name
    return True


def delete(*, token: ApiToken, actor) -> None:
    """Deleting the row (the admin's delete): the token stops working, and the event says who did it."""
    with transaction.atomic():
        audit.emit(
            audit.TOKEN_REVOKED,
            actor=actor,
            detail=f"token {token.name!r} ({token.hint}…) of {token.user.get_username()} deleted",
        )
        token.delete()
