"""The PostgreSQL connection pool across fork().

Django keeps one psycopg_pool per process (a class attribute of the PostgreSQL backend), created at the first
query. A process forked after that — a Celery pool process started or replaced by the worker's main process,
whose heartbeat uses the database — inherits the pool object: its idle connections are sockets shared with the
parent, and its background threads do not exist in the child. The child forgets it and opens its own at its
first query. Nothing is closed in the child: psycopg does not close a connection that another process opened
(it checks the pid), so the parent's connections stay intact."""

import os
import sys

_inherited: list = []  # the parent's pools, kept so that no finalizer of theirs runs in the child
_installed = False


def install_fork_guard() -> None:
    """Once per process: every forked child forgets the pools (and the open connection) of its parent."""
    global _installed
    if not _installed:
        os.register_at_fork(after_in_child=forget_inherited_pools)
        _installed = True


def forget_inherited_pools() -> None:
    backend = sys.modules.get("django.db.backends.postgresql.base")
    if backend is None or not backend.DatabaseWrapper._connection_pools:
        return  # the parent never used PostgreSQL: nothing inherited
    from django.db import connections

    pools = backend.DatabaseWrapper._connection_pools
    _inherited.append(dict(pools))
    pools.clear()
    # The forking thread's own connection, borrowed from the parent's pool, is the parent's too.
    for conn in connections.all(initialized_only=True):
        if conn.vendor == "postgresql" and conn.connection is not None:
            _inherited.append(conn.connection)
            conn.connection = None
