"""The gateway's database calls, off the event loop on a few long-lived threads.

Under ASGI every request would otherwise run its synchronous code on a thread of its own, opening (and
closing) a database connection each time — milliseconds before the first token. On SQLite these threads keep
their connections; on PostgreSQL each call borrows one from the process's pool and gives it back at once
(settings: DB_POOL_SIZE), so that the threads hold none while idle. A connection the server dropped is
replaced and the call made once more; a database that cannot be had answers 503."""

import asyncio
import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings
from django.db import InterfaceError, OperationalError, connections

from .errors import GatewayError

logger = logging.getLogger(__name__)

THREADS = 4
_executor = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="gateway-db")


def _pool_exhausted(exc: Exception) -> bool:
    """Django raises the pool's PoolTimeout as an OperationalError caused by it."""
    return type(exc.__cause__).__name__ == "PoolTimeout"


def _pooled() -> bool:
    return bool(connections["default"].settings_dict.get("OPTIONS", {}).get("pool"))


def _guarded(function):
    def call(*args, **kwargs):
        try:
            try:
                return function(*args, **kwargs)
            except (InterfaceError, OperationalError) as exc:
                if _pool_exhausted(exc) or all(
                    conn.is_usable() for conn in connections.all(initialized_only=True)
                ):
                    raise  # the pool waited already, or a real error (a lock timeout), not a dropped connection
                connections.close_all()
                return function(*args, **kwargs)
        except (InterfaceError, OperationalError) as exc:
            if _pool_exhausted(exc):
                raise GatewayError(
                    503,
                    f"the database is busy: no connection free within {settings.DB_POOL_TIMEOUT}s "
                    f"(LLAMACONTROLLER_DB_POOL_SIZE={settings.DB_POOL_SIZE} per process); try again shortly",
                    code="database_busy",
                    retry_after=1,
                ) from None
            raise GatewayError(
                503, f"the database is unavailable: {exc}", code="database_unavailable"
            ) from exc
        finally:
            if _pooled():
                connections.close_all()  # back to the pool: an idle thread holds no connection

    return call


def db(function):
    """`await db(f)(*args)`: f (synchronous, ORM) on a gateway database thread. The executor's own future,
    not asgiref's sync_to_async: that copies and restores the context and wraps the call in several more
    layers on the way there and back, about a tenth of a streamed request's fixed CPU in the web worker, for
    nothing these calls need (Django's connections are per thread either way)."""
    guarded = _guarded(function)

    async def call(*args):
        return await asyncio.get_running_loop().run_in_executor(_executor, guarded, *args)

    return call


def close_connections() -> None:
    """Close the connection of every gateway database thread (tests: before the test database is dropped,
    which PostgreSQL refuses while sessions are open; SQLite's threads keep theirs)."""
    barrier = threading.Barrier(THREADS)

    def close():
        barrier.wait(timeout=10)  # one task per thread: all of them run at once
        connections.close_all()

    for future in [_executor.submit(close) for _ in range(THREADS)]:
        future.result()


def submit(function, *args) -> None:
    """`function(*args)` on a gateway database thread, not waited for (a cache's refresh); a failure is
    logged."""
    _executor.submit(_guarded(function), *args).add_done_callback(_log_failure)


def _log_failure(future) -> None:
    exc = future.exception()
    if exc is not None:
        logger.warning("a gateway background call failed: %r", exc)
