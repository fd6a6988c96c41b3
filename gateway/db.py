"""The gateway's database calls, off the event loop on a few long-lived threads.

Under ASGI every request would otherwise run its synchronous code on a thread of its own, opening (and
closing) a database connection each time — milliseconds before the first token. On SQLite these threads keep
their connections; on PostgreSQL each call borrows one from the process's pool and gives it back at once
(settings: DB_POOL_SIZE), so that the threads hold none while idle. A connection the server dropped is
replaced and the call made once more; a database that cannot be had answers 503."""

import asyncio
import collections
import contextlib
import functools
import logging
import queue
import threading

from django.conf import settings
from django.db import InterfaceError, OperationalError, connections

from .errors import GatewayError

logger = logging.getLogger(__name__)

THREADS = 4


class _Threads:
    """THREADS long-lived threads (started at the first call). A call goes to the thread idle the shortest
    (its stack and its SQLite connection's page cache still warm), through a queue of its own; one that finds
    none idle waits in the backlog for the first to finish.

    Leaner than `loop.run_in_executor` on a ThreadPoolExecutor, which makes a concurrent Future (a Condition
    and its RLock), takes two locks and a semaphore per call and chains an asyncio future to it: ~40-60 us of
    CPU less per call on this VM (2,000 calls each way, uvloop), twice per gateway request."""

    def __init__(self, count: int):
        self.count = count
        self.lock = threading.Lock()
        self.idle: list[queue.SimpleQueue] = []  # the threads waiting, the most recently idle last
        self.backlog: collections.deque = collections.deque()
        self.started = False

    def put(self, call: tuple) -> None:
        """`call` (function, args, on_done) to a thread; on_done(result, exception) runs on that thread."""
        with self.lock:
            if not self.started:
                self._start()
            if not self.idle:
                self.backlog.append(call)
                return
            inbox = self.idle.pop()
        inbox.put(call)

    def _start(self) -> None:
        self.started = True
        for n in range(self.count):
            inbox = queue.SimpleQueue()
            self.idle.append(inbox)
            threading.Thread(target=self._run, args=(inbox,), name=f"gateway-db_{n}", daemon=True).start()

    def _run(self, inbox: queue.SimpleQueue) -> None:
        while True:
            call = inbox.get()
            while call is not None:
                function, args, on_done = call
                try:
                    result, error = function(*args), None
                except BaseException as exc:  # handed to the caller, as an executor's future would
                    result, error = None, exc
                # Idle again before the answer goes back: the caller's next call comes to this thread.
                with self.lock:
                    if self.backlog:
                        call = self.backlog.popleft()
                    else:
                        self.idle.append(inbox)
                        call = None
                try:
                    on_done(result, error)
                except Exception:
                    logger.exception("a gateway database call's answer could not be handed back")
                function = args = on_done = result = error = None  # nothing held while idle


_threads = _Threads(THREADS)


def _pool_exhausted(exc: Exception) -> bool:
    """Django raises the pool's PoolTimeout as an OperationalError caused by it."""
    return type(exc.__cause__).__name__ == "PoolTimeout"


@functools.cache  # the settings of a process's database do not change; read after every call
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
    """`await db(f)(*args)`: f (synchronous, ORM) on a gateway database thread, sent there at once; the call
    returns a future of the event loop that its outcome is set on (shielding it needs no task). Not asgiref's sync_to_async: that copies and restores the context and wraps the call
    in several more layers on the way there and back, about a tenth of a streamed request's fixed CPU in the
    web worker, for nothing these calls need (Django's connections are per thread either way)."""
    guarded = _guarded(function)

    def call(*args) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()

        def on_done(result, exc):  # on the database thread
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile (tests): nobody waits
                loop.call_soon_threadsafe(_settle, future, result, exc)

        _threads.put((guarded, args, on_done))
        return future

    return call


def _settle(future: asyncio.Future, result, exc) -> None:
    if future.cancelled():  # the caller stopped waiting (the call itself ran to its end)
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(result)


def close_connections() -> None:
    """Close the connection of every gateway database thread (tests: before the test database is dropped,
    which PostgreSQL refuses while sessions are open; SQLite's threads keep theirs)."""
    barrier = threading.Barrier(THREADS)
    done = queue.SimpleQueue()

    def close():
        barrier.wait(timeout=10)  # one task per thread: all of them run at once
        connections.close_all()

    for _ in range(THREADS):
        _threads.put((close, (), lambda result, exc: done.put(exc)))
    for _ in range(THREADS):
        exc = done.get()
        if exc is not None:
            raise exc


def submit(function, *args) -> None:
    """`function(*args)` on a gateway database thread, not waited for (a cache's refresh); a failure is
    logged."""
    _threads.put((_guarded(function), args, _log_failure))


def _log_failure(result, exc) -> None:
    if exc is not None:
        logger.warning("a gateway background call failed: %r", exc)
