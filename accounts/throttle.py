"""Login throttling is django-axes (settings: AXES_*): after LOGIN_MAX_FAILURES failed logins for one
username from one address, that pair is refused for LOGIN_LOCKOUT_SECONDS. Locking the pair, not the
username, means a stranger guessing the admin's password locks only themselves out; the admin still logs
in from their own address. `manage.py axes_reset_username NAME` (or axes_reset) lifts a lock at once.

This module holds what axes calls back into: the client address (REMOTE_ADDR, or X-Forwarded-For as
written by LLAMACONTROLLER_PROXY_COUNT trusted proxies) and the page shown while locked. `client_ip` is the
one place that says who the client is: the login lock, the audit trail and the /metrics allow-list use it.
The web server trusts no forwarded header itself (runner.web_command: --forwarded-allow-ips=), so
REMOTE_ADDR is the connection's peer whatever a client sends."""

import ipaddress
import math

from django.conf import settings
from django.shortcuts import render


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
