"""Login throttling is django-axes (settings: AXES_*): after LOGIN_MAX_FAILURES failed logins for one
username from one address, that pair is refused for LOGIN_LOCKOUT_SECONDS. Locking the pair, not the
username, means a stranger guessing the admin's password locks only themselves out; the admin still logs
in from their own address. `manage.py axes_reset_username NAME` (or axes_reset) lifts a lock at once.
The current password asked for when changing one's own is throttled the same way, per user
(`check_current_password`, counted in PasswordCheckFailures).

This module holds what axes calls back into: the client address (REMOTE_ADDR, or X-Forwarded-For as
written by LLAMACONTROLLER_PROXY_COUNT trusted proxies) and the page shown while locked. `client_ip` is the
one place that says who the client is: the login lock, the audit trail and the /metrics allow-list use it.
The web server trusts no forwarded header itself (runner.web_command: --forwarded-allow-ips=), so
REMOTE_ADDR is the connection's peer whatever a client sends."""

import ipaddress
import math
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.shortcuts import render
from django.utils import timezone

from . import audit
from .models import PasswordCheckFailures


def client_ip(request) -> str | None:
    """The caller's address. X-Forwarded-For is client-controlled: only the entries appended by our own
    proxies count, so with N proxies the client is the N-th address from the right."""
    remote = request.META.get("REMOTE_ADDR")
    proxies = settings.PROXY_COUNT
    if not proxies:
        return remote
    forwarded = [part.strip() for part in request.META.get("HTTP_X_FORWARDED_FOR", "").split(",")]
    forwarded = [part for part in forwarded if part]
    if len(forwarded) < proxies:
        return remote
    address = forwarded[-proxies]
    try:
        ipaddress.ip_address(address)
    except ValueError:  # not written by a proxy of ours (a misconfigured PROXY_COUNT): the peer it is
        return remote
    return address


def lockout_response(request, original_response=None, credentials=None):
    """The login page (web or admin) while this username is locked from this address: 429."""
    minutes = max(1, math.ceil(settings.AXES_COOLOFF_TIME.total_seconds() / 60))
    return render(request, "registration/locked.html", {"minutes": minutes}, status=429)


# --- the current password, when changing one's own -------------------------------------------------------


class PasswordCheckLocked(Exception):
    """Too many wrong current passwords: the change is refused for `seconds` more."""

    def __init__(self, seconds: int):
        self.seconds = max(1, seconds)
        minutes = max(1, math.ceil(self.seconds / 60))
        super().__init__(
            f"too many wrong passwords: changing your password is locked for {minutes} min "
            "(an admin can set it for you meanwhile)"
        )
        self.message = str(self)


def check_current_password(user, password: str, request, where: str) -> bool:
    """Whether `password` is the user's current one, counted like logins: after LOGIN_MAX_FAILURES wrong
    ones in a row (none right in between, the last within LOGIN_LOCKOUT_SECONDS) further checks are
    refused with PasswordCheckLocked for LOGIN_LOCKOUT_SECONDS, right or wrong. Each failure and the lock
    join the audit trail. `where`: the door, for the events ("web form", "API").

    The attempt is counted before the password is checked, with the user's row locked, so that concurrent
    guesses cannot get past the limit; a right password clears the count."""
    now = timezone.now()
    with transaction.atomic():
        PasswordCheckFailures.objects.get_or_create(user=user)
        row = PasswordCheckFailures.objects.select_for_update().get(user=user)
        if row.locked_until is not None and row.locked_until > now:
            raise PasswordCheckLocked(math.ceil((row.locked_until - now).total_seconds()))
        window = timedelta(seconds=settings.LOGIN_LOCKOUT_SECONDS)
        if row.locked_until is not None or (row.last_failure_at and now - row.last_failure_at > window):
            row.failures = 0  # a lock that ended, or failures long ago: start over
        row.failures += 1
        row.last_failure_at, row.locked_until = now, None
        if row.failures >= settings.LOGIN_MAX_FAILURES:
            row.locked_until = now + window
        row.save()
    if user.check_password(password or ""):
        PasswordCheckFailures.objects.filter(user=user).update(
            failures=0, last_failure_at=None, locked_until=None
        )
        return True
    name = user.get_username()[:150]
    source = f" from {client_ip(request)}" if request is not None and client_ip(request) else ""
    audit.emit(
        audit.LOGIN_FAILED,
        actor=user,
        detail=f"username {name!r}: wrong current password ({where}, changing the password){source}",
    )
    if row.locked_until is not None:
        minutes = max(1, round(settings.LOGIN_LOCKOUT_SECONDS / 60))
        audit.emit(
            audit.LOGIN_LOCKED,
            actor=user,
            detail=f"username {name!r}: password change locked{source} for {minutes} min "
            f"after {row.failures} wrong current passwords",
        )
    return False
