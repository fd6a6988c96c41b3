"""Leases end to end: a real worker, the real llama-server and Redis. The pool process that runs a load is
killed right after it recorded llama-server's pid; the instance converges within two reconcile intervals
(seen before: it stayed `starting` until LOAD_TIMEOUT, 132 s)."""

import ctypes
import os
import signal
import stat
import threading
import time

import psutil
import pytest

from models_app import processes, tasks
from models_app.models import GpuInstance, InstanceEvent, LlamaBinary
from models_app.services import request_load, request_unload

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Status = GpuInstance.Status
RECONCILE_SECONDS = 2
SLOW_START_SECONDS = 1.5  # the wrapper's sleep before it execs llama-server (same pid)


@pytest.fixture
def subreaper():
    """llama-servers of a killed pool process are re-parented to us (and reaped) instead of PID 1."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    yield
    libc.prctl(36, 0, 0, 0, 0)


@pytest.fixture
def ticker():
    """Stands in for celery beat: the reconcile fan-out every RECONCILE_SECONDS."""
    stop = threading.Event()

    def run():
        while not stop.wait(RECONCILE_SECONDS):
            tasks.dispatch_reconcile.apply_async()

    threading.Thread(target=run, daemon=True).start()
    yield
    stop.set()


@pytest.fixture
def slow_start(fake_gpus, tiny_model, llama_server_path, settings, tmp_path):
    """The tiny model starts in ~50 ms: too fast to kill a worker in the middle. A wrapper that sleeps, then
    execs the real llama-server, gives the kill a window that is known in advance."""
    # Binaries come from the worker's configuration: the wrapper sits in an allowed folder.
    wrapper = tmp_path / "builds" / "llama-server-slow"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nsleep {SLOW_START_SECONDS}\nexec "{llama_server_path}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    tiny_model.binary = LlamaBinary.objects.create(host=fake_gpus.host, name="slow", path=str(wrapper))
    tiny_model.save()
    settings.LLAMA_SERVER = str(llama_server_path)
    settings.RECONCILE_SECONDS = RECONCILE_SECONDS
    return {"LLAMACONTROLLER_LLAMA_SERVER_DIRS": str(wrapper.parent)}


def _kill_pool_process_mid_load(instance) -> float:
    """Wait for the pid to be recorded, then SIGKILL the pool process that started it (its parent)."""
    deadline = time.monotonic() + 30
    while not GpuInstance.objects.get(pk=instance.pk).pid:
        assert time.monotonic() < deadline, f"llama-server was not started: {instance.events.all()}"
        time.sleep(0.01)
    instance.refresh_from_db()
    pool_process = psutil.Process(psutil.Process(instance.pid).ppid())
    assert "celery" in " ".join(pool_process.cmdline())
    assert instance.status == Status.STARTING and instance.lease_expires_at is not None
    os.kill(pool_process.pid, signal.SIGKILL)
    killed_at = time.monotonic()
    assert processes.health_status(instance.port) != 200  # still loading: nobody watches it now
    return killed_at


def _wait_settled(instance, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instance.refresh_from_db()
        if instance.status not in (Status.PENDING, Status.STARTING):
            return time.monotonic()
        time.sleep(0.05)
    raise AssertionError(f"instance #{instance.pk} still {instance.status} after {timeout}s")


def test_pool_process_killed_mid_load_runs_within_two_reconcile_intervals(
    start_worker, slow_start, subreaper, ticker, settings
):
    start_worker(**slow_start)
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    killed_at = _kill_pool_process_mid_load(instance)
    settled_at = _wait_settled(instance, timeout=30)
    took = settled_at - killed_at
    print(f"killed mid-load; instance {instance.status} {took:.1f}s later")
    assert instance.status == Status.RUNNING, instance.error
    # Two reconcile intervals, plus the start's own remaining time and a pass's work.
    assert took <= 2 * RECONCILE_SECONDS + SLOW_START_SECONDS + 1.5
    assert processes.health_status(instance.port) == 200
    assert instance.lease_expires_at is None
    adopted = instance.events.filter(kind=InstanceEvent.Kind.ADOPTED).exists() or (
        "adopted" in instance.events.get(kind=InstanceEvent.Kind.HEALTHY).detail
    )
    assert adopted  # by the reconcile pass (healthy already) or the task it sent (still loading)
    request_unload(instance=instance, actor=None)
    deadline = time.monotonic() + 30
    while GpuInstance.objects.get(pk=instance.pk).status != Status.STOPPED:
        assert time.monotonic() < deadline, "unload did not finish"
        time.sleep(0.05)
    assert not processes.is_alive(instance.pid, instance.process_create_time)


def test_pool_process_and_llama_server_killed_mid_load_fails_within_two_reconcile_intervals(
    start_worker, slow_start, subreaper, ticker, settings
):
    start_worker(**slow_start)
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    killed_at = _kill_pool_process_mid_load(instance)
    os.killpg(instance.pid, signal.SIGKILL)
    settled_at = _wait_settled(instance, timeout=30)
    took = settled_at - killed_at
    print(f"killed mid-load with its llama-server; instance {instance.status} {took:.1f}s later")
    assert instance.status == Status.FAILED
    assert "exited while loading, and the worker that started it was lost" in instance.error
    assert took <= 2 * RECONCILE_SECONDS + 1.5
    assert not instance.gpu_links.filter(active=True).exists()
