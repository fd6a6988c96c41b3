"""Database, broker and worker checks, for /healthz, the API's health endpoint, the dashboard and the
services that refuse work the worker would never see. The broker ping is cached for a few seconds, so no
caller (an anonymous /healthz poller included) can turn it into load on the broker."""

import threading
import time

import redis
from celery import current_app
from django.conf import settings
from django.core.cache import cache
from django.db import connection

from gpus.models import Host

BROKER_CHECK_CACHE_SECONDS = 3.0

_broker_lock = threading.Lock()
_broker_clients: dict[str, redis.Redis] = {}
_broker_answers: dict[str, tuple[float, str | None]] = {}


def broker_error(url: str, *, max_age: float = BROKER_CHECK_CACHE_SECONDS) -> str | None:
    """Why the broker at `url` does not answer a ping within a second, or None when it does. The answer
    is reused for `max_age` seconds (0: ask now). One client (and its pool) per URL and process."""
    now = time.monotonic()
    with _broker_lock:
        cached = _broker_answers.get(url)
        if cached is not None and now - cached[0] < max_age:
            return cached[1]
        client = _broker_clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
            _broker_clients[url] = client
    try:
        client.ping()
        error = None
    except Exception as exc:  # a malformed URL raises other types than RedisError
        error = str(exc)
    with _broker_lock:
        _broker_answers[url] = (time.monotonic(), error)
    return error


def check_database() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return {"ok": True}
    except Exception as exc:  # any driver error means "down"; the message says why
        return {"ok": False, "error": str(exc)}


def check_broker() -> dict:
    error = broker_error(settings.REDIS_URL)
    return {"ok": True} if error is None else {"ok": False, "error": f"broker unreachable: {error}"}


def check_workers() -> dict:
    """A worker counts as alive when its host refreshed recently (heartbeat), else when it answers a ping."""

    try:
        fresh = list(Host.objects.up().values_list("name", flat=True))
    except Exception as exc:
        return {"ok": False, "error": str(exc)}
    if fresh:
        return {"ok": True, "hosts": fresh, "via": "heartbeat"}
    try:
        replies = current_app.control.ping(timeout=1.0)
    except Exception as exc:
        return {"ok": False, "error": f"no worker heartbeat and ping failed: {exc}"}
    if replies:
        return {"ok": True, "workers": sorted(name for reply in replies for name in reply), "via": "ping"}
    return {"ok": False, "error": "no worker heartbeat and no worker answered a ping"}


def overall() -> dict:
    """Every check, and `status` ok/error; the answer is reused for a few seconds (the worker ping can
    cost a second, and callers may be anonymous)."""
    return cache.get_or_set("health:overall", _overall, BROKER_CHECK_CACHE_SECONDS)


def _overall() -> dict:
    database = check_database()
    broker = check_broker()
    workers = check_workers() if broker["ok"] else {"ok": False, "error": "broker unreachable"}
    ok = database["ok"] and broker["ok"] and workers["ok"]
    return {"status": "ok" if ok else "error", "database": database, "broker": broker, "workers": workers}
