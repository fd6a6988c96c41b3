"""Several hosts, one control plane: which worker holds a host name, and its heartbeat.

A host's worker claims the host name when it starts (`claim`), before it takes any task: a second worker for
the same name refuses to start while the first is alive, so two workers never manage the same processes. The
claim names the worker by machine id, pid and process start time. On the same machine a holder whose process
is gone (killed with SIGKILL) is replaced at once; on another machine only after the host timed out.

The claimed worker writes `Host.last_seen` every HOST_HEARTBEAT_SECONDS from a thread of its main process
(`Heartbeat`), but only after it pinged itself through the broker and its consumer answered: "up" means the
worker can take work, not only that its process runs (a worker that retries a dead broker address writes no
heartbeat, so its host goes down and its work is given up). The ping is answered by the consumer of the main
process, so a pool busy with long loads does not silence the host. When a heartbeat finds the host was down,
the host has returned: an event says so and a reconcile pass adopts the instances whose processes outlived
the silence (models_app/reconcile.py). A worker whose claim was taken over by another stops itself."""

import logging
import os
import signal
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import psutil
from django.conf import settings
from django.db import connections, transaction
from django.utils import timezone

from gpus.models import Host, alive_cutoff

from . import dispatch
from .events import record
from .models import InstanceEvent

logger = logging.getLogger(__name__)

MACHINE_ID_FILES = ("/etc/machine-id", "/var/lib/dbus/machine-id")


class HostNameTaken(Exception):
    """Another live worker holds the host name."""


@dataclass(frozen=True)
class WorkerIdentity:
    machine_id: str
    hostname: str
    pid: int
    started_at: datetime  # the process's start time: a reused pid has another one

    def describe(self) -> str:
        return f"pid {self.pid} on {self.hostname} (machine {self.machine_id[:12]})"


def machine_id() -> str:
    """LLAMACONTROLLER_MACHINE_ID, else the OS's machine id, else one generated in the data folder."""
    if settings.MACHINE_ID:
        return settings.MACHINE_ID
    for name in MACHINE_ID_FILES:
        try:
            value = Path(name).read_text().strip()
        except OSError:
            continue
        if value:
            return value
    path = Path(settings.DATA_DIR) / "machine-id"
    try:
        return path.read_text().strip()
    except OSError:
        value = uuid.uuid4().hex
        path.write_text(value + "\n")
        return value


def this_worker() -> WorkerIdentity:
    created = psutil.Process().create_time()
    return WorkerIdentity(
        machine_id=machine_id(),
        hostname=socket.gethostname(),
        pid=os.getpid(),
        started_at=datetime.fromtimestamp(round(created, 3), tz=UTC),
    )


def host_address() -> str:
    """How other nodes reach this host's llama-servers."""
    bind = settings.LLAMA_SERVER_HOST
    if bind not in ("", "0.0.0.0", "::"):
        return bind
    return settings.HOST_ADDRESS or socket.getfqdn()


def _holder_alive_here(host: Host) -> bool:
    """The holder runs on this machine: is its process still the one that claimed?"""
    try:
        created = psutil.Process(host.worker_pid).create_time()
    except (psutil.Error, TypeError, ValueError):
        return False
    return host.worker_started_at is not None and abs(created - host.worker_started_at.timestamp()) < 1.0


def _held_by_other(host: Host, me: WorkerIdentity) -> str | None:
    """Why `host` is held by another live worker, or None when `me` may take it."""
    if not host.worker_pid or (host.worker_machine_id, host.worker_pid) == (me.machine_id, me.pid):
        return None
    seen = host.last_seen and timezone.localtime(host.last_seen).strftime("%H:%M:%S")
    holder = f"pid {host.worker_pid} on {host.worker_hostname or '?'}"
    if host.worker_machine_id == me.machine_id:
        if _holder_alive_here(host):
            return f"{holder} (this machine) is running, last heartbeat {seen}"
        return None  # gone (killed, crashed): its successor takes over at once
    if host.last_seen is not None and host.last_seen >= alive_cutoff():
        return f"{holder} (machine {host.worker_machine_id[:12]}) sent a heartbeat at {seen}"
    return None


def claim(host_name: str, me: WorkerIdentity | None = None) -> Host:
    """Take the host name for this worker, or raise HostNameTaken saying who holds it. Creates the host."""
    me = me or this_worker()
    with transaction.atomic():
        Host.objects.get_or_create(name=host_name)
        host = Host.objects.select_for_update().get(name=host_name)
        held = _held_by_other(host, me)
        if held:
            raise HostNameTaken(
                f"host name {host_name!r} is held by another worker: {held}. Stop that worker, or give this "
                "one its own LLAMACONTROLLER_HOST_NAME; two workers must never manage the same processes."
            )
        was_down = host.last_seen is not None and host.last_seen < alive_cutoff()
        previous = host.last_seen
        host.worker_machine_id, host.worker_hostname = me.machine_id, me.hostname
        host.worker_pid, host.worker_started_at = me.pid, me.started_at
        host.address = host_address()
        host.last_seen = timezone.now()
        host.save(
            update_fields=[
                "worker_machine_id", "worker_hostname", "worker_pid", "worker_started_at", "address",
                "last_seen",
            ]
        )  # fmt: skip
        if was_down:
            _record_return(host, previous)
    logger.info("%s: host name claimed by %s", host_name, me.describe())
    return host


def release(host_name: str, me: WorkerIdentity | None = None) -> None:
    """A worker that stops cleanly lets go of the name (its instances stay; the host times out as usual)."""
    me = me or this_worker()
    Host.objects.filter(name=host_name, worker_machine_id=me.machine_id, worker_pid=me.pid).update(
        worker_pid=None
    )


def _record_return(host: Host, previous) -> None:
    since = timezone.localtime(previous).strftime("%H:%M:%S") if previous else "?"
    record(InstanceEvent.Kind.HOST_RETURNED, detail=f"host {host.name} answers again (silent since {since})")
    logger.warning("host %s answers again (silent since %s)", host.name, since)


def heartbeat(host_name: str, me: WorkerIdentity) -> bool:
    """One heartbeat. False when another worker holds the name now (this one must stop)."""
    now = timezone.now()
    mine = Host.objects.filter(name=host_name, worker_machine_id=me.machine_id, worker_pid=me.pid)
    previous = mine.values_list("last_seen", flat=True).first()
    if not mine.update(last_seen=now):
        return False
    if previous is not None and previous < alive_cutoff():
        host = Host.objects.get(name=host_name)
        _record_return(host, previous)
        # the pass that adopts what outlived the silence, now rather than at its turn
        dispatch.send_reconcile(host, at_once=True)
    return True


def broker_probe(app, nodename: str) -> Callable[[], str | None]:
    """A check that this worker (Celery node `nodename`) takes work: a ping sent through the broker, answered
    by the worker's own consumer. The probe returns None when it answered, else why not."""
    timeout = min(5.0, max(1.0, settings.HOST_HEARTBEAT_SECONDS / 2))

    def probe() -> str | None:
        try:
            replies = app.control.ping(destination=[nodename], timeout=timeout)
        except Exception as exc:  # the broker cannot be reached at all
            return f"the broker cannot be reached: {exc}"
        if any(nodename in reply for reply in replies):
            return None
        return f"the worker did not answer a ping through the broker within {timeout:g}s"

    return probe


class Heartbeat(threading.Thread):
    """The worker's heartbeat, in its main process (the pool's children come and go). With a `probe`, a
    beat is written only when the probe finds that the worker takes work."""

    def __init__(self, host_name: str, me: WorkerIdentity, probe: Callable[[], str | None] | None = None):
        super().__init__(name=f"heartbeat-{host_name}", daemon=True)
        self.host_name, self.me, self.probe = host_name, me, probe
        self.stopped = threading.Event()
        self.withheld: str | None = None  # why the last beat was not written

    def can_take_work(self) -> bool:
        reason = self.probe() if self.probe else None
        if reason and reason != self.withheld:
            logger.error("%s: no heartbeat written: %s", self.host_name, reason)
        elif not reason and self.withheld:
            logger.warning("%s: the worker takes work again; heartbeats resume", self.host_name)
        self.withheld = reason
        return reason is None

    def run(self) -> None:
        while not self.stopped.wait(settings.HOST_HEARTBEAT_SECONDS):
            try:
                if not self.beat():
                    return
            finally:
                connections.close_all()  # none held between beats (PostgreSQL: back to the process's pool)

    def beat(self) -> bool:
        """One beat. False when another worker holds the host name now: this one stops."""
        if not self.can_take_work():
            return True
        try:
            if heartbeat(self.host_name, self.me):
                return True
        except Exception:  # the database may be briefly away: the next beat tries again
            logger.exception("%s: heartbeat failed", self.host_name)
            connections.close_all()
            return True
        logger.critical(
            "%s: another worker holds this host name now; this worker (%s) stops",
            self.host_name,
            self.me.describe(),
        )
        os.kill(os.getpid(), signal.SIGTERM)
        return False

    def stop(self) -> None:
        self.stopped.set()
