"""GET /healthz: database, broker and worker status as JSON; 200 when all is well, 503 otherwise."""

import threading
from datetime import timedelta

import redis
from django.conf import settings
from django.db import connection
from django.http import JsonResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET


def check_database() -> dict:
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
        return {"ok": True}
    except Exception as exc:  # any driver error means "down"; the message says why
        return {"ok": False, "error": str(exc)}


_broker_lock = threading.Lock()
_broker_clients: dict[str, redis.Redis] = {}


def broker_error(url: str) -> str | None:
    """Why the broker at `url` does not answer a ping within a second, or None when it does. One client
    (and its connection pool) per URL and process, so a request pays one round trip, not a connect."""
    with _broker_lock:
        client = _broker_clients.get(url)
        if client is None:
            client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
            _broker_clients[url] = client
    try:
        client.ping()
    except Exception as exc:  # a malformed URL raises other types than RedisError
        return str(exc)
    return None


def check_broker() -> dict:
    error = broker_error(settings.REDIS_URL)
    return {"ok": True} if error is None else {"ok": False, "error": f"broker unreachable: {error}"}


def check_workers() -> dict:
    """A worker counts as alive when its host refreshed recently (heartbeat), else when it answers a ping."""
    from gpus.models import Host

    horizon = timezone.now() - timedelta(seconds=max(3 * settings.GPU_REFRESH_SECONDS, 30))
    try:
        fresh = list(Host.objects.filter(last_seen__gte=horizon).values_list("name", flat=True))
    except Exception as exc:
        return {"ok": False, "error": str(exc)}
    if fresh:
        return {"ok": True, "hosts": fresh, "via": "heartbeat"}
    try:
        from llamacontroller_site.celery import app

        replies = app.control.ping(timeout=1.0)
    except Exception as exc:
        return {"ok": False, "error": f"no worker heartbeat and ping failed: {exc}"}
    if replies:
        return {"ok": True, "workers": sorted(name for reply in replies for name in reply), "via": "ping"}
    return {"ok": False, "error": "no worker heartbeat and no worker answered a ping"}


@never_cache
@require_GET
def healthz(request):
    database = check_database()
    broker = check_broker()
    workers = check_workers() if broker["ok"] else {"ok": False, "error": "broker unreachable"}
    ok = database["ok"] and broker["ok"] and workers["ok"]
    body = {"status": "ok" if ok else "error", "database": database, "broker": broker, "workers": workers}
    return JsonResponse(body, status=200 if ok else 503)
