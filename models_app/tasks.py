"""Celery tasks: thin. Arguments are ids; a task re-fetches what it needs, returns quietly if the row is gone,
and calls load/stop/orphans/reconcile/memory. Load, unload and refresh tasks run on the queue of the host that owns
the GPUs (`host.<name>`); the dispatchers run anywhere and fan out to every host."""

import logging
import sys

from celery import shared_task
from celery.signals import task_postrun, worker_init, worker_process_init, worker_ready, worker_shutdown
from django.conf import settings
from django.contrib.auth import get_user_model
from django.db import connections

from gpus.models import Host
from gpus.services import register_host
from utilities.periodic import idempotent, once_per_period

from . import (
    binaries,
    cluster,
    dispatch,
    folder_scan,
    hosts,
    live,
    load,
    memory,
    model_files,
    ondemand,
    orphans,
    reconcile,
    stop,
    subreaper,
)

logger = logging.getLogger(__name__)


def _user(actor_id: int | None):
    return get_user_model().objects.filter(pk=actor_id).first() if actor_id else None


@shared_task(name="models_app.tasks.load_model", ignore_result=True)
def load_model(instance_id: int) -> None:
    load.load_instance(instance_id)


@shared_task(name="models_app.tasks.resume_start", ignore_result=True)
def resume_start(instance_id: int) -> None:
    load.resume_start(instance_id)


@shared_task(name="models_app.tasks.unload_model", ignore_result=True)
def unload_model(instance_id: int, actor_id: int | None = None) -> None:
    stop.unload_instance(instance_id, actor=_user(actor_id))


@shared_task(name="models_app.tasks.kill_orphan", ignore_result=True)
def kill_orphan(
    host_name: str, pid: int, actor_id: int | None = None, gpu_id: int | None = None
) -> str | None:
    host = Host.objects.filter(name=host_name).first()
    if host is None:
        return None
    message = orphans.kill_orphan(host, pid, actor=_user(actor_id), gpu_id=gpu_id)
    logger.info(message)
    return message


@shared_task(name="models_app.tasks.reconcile_host", ignore_result=True)
def reconcile_host(host_name: str) -> dict:
    return reconcile.reconcile_host(host_name)


@shared_task(name="models_app.tasks.check_model_files", ignore_result=True)
def check_model_files(host_name: str) -> dict:
    """On the host's queue: report which registered models this host can serve (models_app/model_files.py)."""
    host = Host.objects.filter(name=host_name).first()
    return model_files.check_on_this_host(host) if host is not None else {}


@shared_task(name="models_app.tasks.scan_model_folders", ignore_result=True)
def scan_model_folders(host_name: str) -> dict:
    """On the host's queue: list the GGUF files in this host's model folders (models_app/folder_scan.py)."""
    host = Host.objects.filter(name=host_name).first()
    return folder_scan.scan_on_this_host(host) if host is not None else {}


@shared_task(name="models_app.tasks.refresh_host", ignore_result=True)
def refresh_host(host_name: str) -> None:
    memory.refresh_host_memory(host_name)


def live_hosts() -> list[Host]:
    """A down host gets no periodic tasks: expired messages are dropped only when a worker takes them, so a
    dead host's queue would otherwise grow without end. Its worker's heartbeat brings it back."""
    return list(Host.objects.up())


@shared_task(name="models_app.tasks.dispatch_refresh", ignore_result=True)
# Two beats: one fan-out per period (utilities/periodic.py).
@once_per_period(lambda: settings.GPU_REFRESH_SECONDS)
def dispatch_refresh() -> int:
    """Beat: one GPU refresh per live host, expiring before the next one is due."""
    return dispatch.fan_out(dispatch.REFRESH_HOST, live_hosts(), expires=settings.GPU_REFRESH_SECONDS * 0.8)


@shared_task(name="models_app.tasks.dispatch_reconcile", ignore_result=True)
@once_per_period(lambda: settings.RECONCILE_SECONDS)
def dispatch_reconcile() -> int:
    """Beat: one reconcile pass per live host, expiring before the next one is due."""
    return dispatch.fan_out(dispatch.RECONCILE_HOST, live_hosts(), expires=settings.RECONCILE_SECONDS * 0.8)


@shared_task(name="models_app.tasks.dispatch_folder_scans", ignore_result=True)
@once_per_period(lambda: settings.MODEL_SCAN_SECONDS)
def dispatch_folder_scans() -> int:
    """Beat: one scan of the model folders per live host, expiring before the next one is due."""
    return dispatch.fan_out(
        dispatch.SCAN_MODEL_FOLDERS, live_hosts(), expires=settings.MODEL_SCAN_SECONDS * 0.8
    )


@shared_task(name="models_app.tasks.check_hosts", ignore_result=True)
# Its instance transitions are compare-and-set, but a lost host's GPUs are marked after an exists() check: two
# passes at once could mark them (and record the event) twice.
@once_per_period(lambda: settings.HOST_CHECK_SECONDS)
def check_hosts() -> dict:
    """Beat, on the default queue: hosts that went down get their GPUs marked, their running instances
    `unknown` and their pending and stopping work failed; on hosts that are up, loads no worker took are sent
    again and then given up, as are unloads nobody finished (models_app/hosts.py)."""
    return hosts.check_hosts()


@shared_task(name="models_app.tasks.unload_idle", ignore_result=True)
@idempotent("each instance is unloaded under its row lock after checking again that it runs and is idle")
def unload_idle() -> int:
    """Beat, on the default queue: unload instances idle past their keep-alive (models_app.ondemand)."""
    return len(ondemand.unload_idle())


def _host_worker(sender) -> bool:
    """Whether this worker consumes its host's queue (a worker for the default queue only owns no GPUs)."""
    queues = getattr(getattr(sender, "app", None), "amqp", None)
    consumed = getattr(getattr(queues, "queues", None), "consume_from", None)
    return not consumed or settings.HOST_QUEUE in consumed


_heartbeat: cluster.Heartbeat | None = None
_reaper: subreaper.OrphanReaper | None = None
_live: live.LiveRefresh | None = None


@worker_init.connect
def on_worker_init(sender=None, **kwargs) -> None:
    """Before it takes any task, a host's worker claims its host name; a second worker for a name that a
    live worker holds stops here, with the reason (models_app/cluster.py)."""
    if not _host_worker(sender):
        return
    # Before the pool forks: llama-servers of a pool process that dies come to this process, not PID 1, and
    # their exit codes are kept (models_app/subreaper.py).
    subreaper.become_subreaper()
    try:
        cluster.claim(settings.HOST_NAME)
    except cluster.HostNameTaken as exc:
        logger.critical("refusing to start: %s", exc)
        print(f"llamacontroller worker: refusing to start: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(78) from None  # EX_CONFIG: systemd's Restart= does not help until it is fixed
    finally:
        connections.close_all()


@worker_process_init.connect
def on_worker_process_init(**kwargs) -> None:
    """A pool process keeps its SQLite connection from one task to the next (settings.CELERY_DB_REUSE_MAX):
    one thread per pool process, so one connection. PostgreSQL: Celery closes them after each task."""
    for conn in connections.all():
        if conn.vendor == "sqlite":
            conn.settings_dict["CONN_MAX_AGE"] = None


@task_postrun.connect
def close_failed_connections(sender=None, **kwargs) -> None:
    """Where Celery reuses connections (CELERY_DB_REUSE_MAX), one that failed, or that is not to be kept
    (CONN_MAX_AGE 0), is closed after each task, as Django does after each request (not after a task run
    eagerly, inside its caller's transaction)."""
    if settings.CELERY_DB_REUSE_MAX and not getattr(getattr(sender, "request", None), "is_eager", False):
        for conn in connections.all(initialized_only=True):
            conn.close_if_unusable_or_obsolete()


@worker_ready.connect
def on_worker_ready(sender=None, **kwargs) -> None:
    """A host's worker starts: register the host and its GPUs, discover and verify its llama-server
    binaries (with their flag catalogues), reconcile, and start the heartbeat, the reaper of the
    llama-servers that pool processes leave behind (models_app/subreaper.py) and, where the backend is cheap,
    the live GPU figures between the full refreshes (models_app/live.py)."""
    global _heartbeat, _reaper, _live
    if not _host_worker(sender):
        return
    try:
        host = register_host(settings.HOST_NAME)
        # The only way a binary enters the registry: found in this host's configuration and verified.
        binaries.store_on_host(host)
        for binary in host.llama_binaries.all():
            logger.info("%s: llama-server %s %s", host.name, binary.path, binary.error or binary.version)
        if host.llama_server_error:
            logger.error("%s: %s", host.name, host.llama_server_error)
        try:  # which registered models this host can serve; a failure must not skip the reconcile below
            logger.info("model files on %s: %s", host.name, model_files.check_on_this_host(host))
        except Exception:
            logger.exception("%s: checking the model files failed", host.name)
        # The GGUF files in this host's model folders (Add a model), as a task on its own queue: a scan takes
        # up to folder_scan.MAX_SECONDS and must not hold back the heartbeat started below.
        try:  # the broker away a moment: the beat's next scan lists them; the reconcile below must run
            dispatch.send_folder_scans([host], expires=settings.MODEL_SCAN_SECONDS)
        except Exception:
            logger.exception("%s: sending the scan of the model folders failed", host.name)
        logger.info("reconcile at start of %s: %s", host.name, reconcile.reconcile_host(host.name))
    except Exception:  # a failed start-up check must not stop the worker; the next reconcile tries again
        logger.exception("start-up of the %s worker failed", settings.HOST_NAME)
    finally:
        connections.close_all()
    # Each beat first pings this worker through the broker: "up" means it takes work (models_app/cluster.py).
    probe = cluster.broker_probe(sender.app, sender.hostname)
    _heartbeat = cluster.Heartbeat(settings.HOST_NAME, cluster.this_worker(), probe=probe)
    _heartbeat.start()
    _reaper = subreaper.OrphanReaper()
    _reaper.start()
    if live.wanted():
        heartbeat = _heartbeat
        _live = live.LiveRefresh(settings.HOST_NAME, may_run=lambda: heartbeat.withheld is None)
        _live.start()


@worker_shutdown.connect
def on_worker_shutdown(sender=None, **kwargs) -> None:
    for thread in (_reaper, _live):
        if thread is not None:
            thread.stop()
    if _heartbeat is None:
        return
    _heartbeat.stop()
    try:
        cluster.release(settings.HOST_NAME)
    except Exception:
        logger.exception("%s: could not release the host name", settings.HOST_NAME)
    finally:
        connections.close_all()
