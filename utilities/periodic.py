"""Periodic tasks with two beats by mistake: each beat task acts once per period, or is idempotent.

Celery beat must run once per cluster, but nothing stops an operator from starting a second one (a second web
node, a forgotten `./lc.sh run`). Each beat then sends every periodic task, so each would act twice per period:
twice the GPU refreshes and reconcile passes fanned out to every host, a host marked lost twice, an alert fired
twice. Every task in CELERY_BEAT_SCHEDULE therefore carries one of two marks (a test checks it):

- `once_per_period(seconds)`: the task takes a short Redis lock (`SET key value NX PX`, keyed by the task's
  name, on the Celery broker) before it acts, and gives up quietly when another run holds it. The lock expires
  at 0.8 of the period, a little before the next run is due, and is never released early: a second beat's
  message for the same period, taken a moment later, finds it held. Two beats out of phase still act once per
  period (whichever sends first after the lock expired acts; the other's message finds the lock). A run that
  fails has still used its period: the next period's run tries again.
- `idempotent(reason)`: acting twice does no harm (e.g. a second prune finds nothing left to delete).

If Redis cannot be asked (it is the broker, so this is rare: the task came through it), the task runs anyway
and the error is logged: a missed lock doubles a period's work, which the tasks survive; a skipped run would
lose it (no GPU refresh, no reconcile, no host check) for as long as Redis is ill.

The test settings turn the locks off (PERIODIC_LOCKS = False): tests call these tasks directly, several times
in a row; tests/foundation/test_beat_once.py turns them back on."""

import functools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import redis
from django.conf import settings

logger = logging.getLogger(__name__)

KEY_PREFIX = "llamacontroller:periodic:"
LOCK_SHARE = 0.8  # of the period: the lock is gone a little before the next run is due
REDIS_TIMEOUT = 2.0  # seconds; a stuck Redis must not stall the task for long

_client: redis.Redis | None = None
_client_url = ""
_client_lock = threading.Lock()


def redis_client() -> redis.Redis:
    """This process's client for settings.REDIS_URL, made on first use (after a prefork worker forked: redis-py
    also resets its pool when it sees another pid)."""
    global _client, _client_url
    with _client_lock:
        if _client is None or _client_url != settings.REDIS_URL:
            _client = redis.Redis.from_url(
                settings.REDIS_URL, socket_connect_timeout=REDIS_TIMEOUT, socket_timeout=REDIS_TIMEOUT
            )
            _client_url = settings.REDIS_URL
        return _client


def lock_key(name: str) -> str:
    return KEY_PREFIX + name


def claim_period(name: str, seconds: float) -> bool:
    """Whether this run holds `name`'s lock for this period (True also when Redis could not be asked)."""
    ttl_ms = max(1, int(seconds * LOCK_SHARE * 1000))
    holder = f"{socket.gethostname()}:{os.getpid()}:{time.time():.3f}"
    try:
        return bool(redis_client().set(lock_key(name), holder, nx=True, px=ttl_ms))
    except (redis.RedisError, OSError) as exc:
        logger.warning("%s: no once-per-period lock (%s); running anyway", name, exc)
        return True


def once_per_period(seconds: float | Callable[[], float], name: str | None = None):
    """Decorate a beat task's function (under @shared_task): it acts at most once per `seconds` (a number, or
    a callable read at each run, e.g. `lambda: settings.RECONCILE_SECONDS`), whoever sends it. A run that
    finds the lock held returns None. `name`: the lock's key, by default the function's dotted name (which is
    the task name here)."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        key = name or f"{func.__module__}.{func.__name__}"

        @functools.wraps(func)
        def guarded(*args, **kwargs):
            period = seconds() if callable(seconds) else seconds
            if getattr(settings, "PERIODIC_LOCKS", True) and not claim_period(key, period):
                logger.debug("%s: already run this period (another beat sent it too); skipped", key)
                return None
            return func(*args, **kwargs)

        guarded.periodic_guard = ("once_per_period", key, seconds)
        return guarded

    return decorate


def idempotent(reason: str):
    """Mark a beat task that may safely run twice in a period; `reason` says why (for the reader and the
    test that every beat task is marked)."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        func.periodic_guard = ("idempotent", reason)
        return func

    return decorate


def period_of(guard: tuple) -> float | None:
    """The period a once_per_period mark locks for (None for an idempotent mark)."""
    if guard[0] != "once_per_period":
        return None
    seconds = guard[2]
    return seconds() if callable(seconds) else seconds
