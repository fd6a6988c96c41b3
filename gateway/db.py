"""The gateway's database calls, off the event loop on a few long-lived threads.

Under ASGI every request would otherwise run its synchronous code on a thread of its own, opening (and
closing) a database connection each time — milliseconds before the first token. These threads keep their
connections (as CONN_MAX_AGE would); a connection the server dropped is replaced and the call made once
more."""

from concurrent.futures import ThreadPoolExecutor

from asgiref.sync import sync_to_async
from django.db import InterfaceError, OperationalError, connections

_executor = ThreadPoolExecutor(max_workers=4, thread_name_prefix="gateway-db")


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
