"""The gateway's database calls, off the event loop on a few long-lived threads.

Under ASGI every request would otherwise run its synchronous code on a thread of its own, opening (and
closing) a database connection each time — milliseconds before the first token. These threads keep their
connections (as CONN_MAX_AGE would); a connection the server dropped is replaced and the call made once
more."""

import logging
import threading
from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.db import InterfaceError, OperationalError, connections

logger = logging.getLogger(__name__)

THREADS = 4
_executor = ThreadPoolExecutor(max_workers=THREADS, thread_name_prefix="gateway-db")


def _guarded(function):
    def call(*args, **kwargs):
        try:
            return function(*args, **kwargs)
        except (InterfaceError, OperationalError):
            if all(conn.is_usable() for conn in connections.all(initialized_only=True)):
                raise  # a real error (a lock timeout, a constraint), not a dropped connection
            connections.close_all()
            return function(*args, **kwargs)

    return call


def db(function):
    """`await db(f)(*args)`: f (synchronous, ORM) on a gateway database thread."""
    return sync_to_async(_guarded(function), thread_sensitive=False, executor=_executor)


def close_connections() -> None:
    """Close the connection of every gateway database thread (tests: before the test database is dropped,
    which PostgreSQL refuses while sessions are open)."""
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
