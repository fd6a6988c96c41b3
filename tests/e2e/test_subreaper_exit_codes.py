"""Killing a Celery pool process (issue 16, item 8). Seen before: every llama-server it had started was
re-parented to PID 1, so a later crash lost its exit code ("exited unexpectedly", no code). Now the worker's
main process (a child subreaper) takes them, reaps them when they exit, and the crash records the code."""

import os
import signal
import time

import psutil
import pytest

from models_app import tasks
from models_app.models import GpuInstance
from models_app.services import request_load

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Status = GpuInstance.Status


def _until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what} not within {timeout}s")


def test_a_crash_after_its_pool_process_was_killed_keeps_its_exit_code(celery_worker, tiny_model):
    main = celery_worker.process.pid  # `celery worker` (prefork pool, -c 2): its main process
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    _until(lambda: GpuInstance.objects.get(pk=instance.pk).status == Status.RUNNING, 60, "running")
    instance.refresh_from_db()
    server = psutil.Process(instance.pid)
    pool = psutil.Process(server.ppid())
    assert pool.pid != main and pool.ppid() == main, "llama-server is started by a pool process"

    os.kill(pool.pid, signal.SIGKILL)
    _until(lambda: server.ppid() != pool.pid, 10, "re-parenting")
    assert server.ppid() == main  # the worker's main process, not PID 1
    assert GpuInstance.objects.get(pk=instance.pk).status == Status.RUNNING

    os.kill(instance.pid, signal.SIGKILL)  # llama-server crashes later

    def crashed():
        tasks.reconcile_host.apply_async(args=["testhost"], queue="host.testhost")  # as beat does
        time.sleep(0.5)
        return GpuInstance.objects.get(pk=instance.pk).status == Status.CRASHED

    _until(crashed, 30, "the crash")
    instance.refresh_from_db()
    assert instance.exit_code == -9, instance.error
    assert f"llama-server (pid {instance.pid}) exited unexpectedly with code -9" in instance.error
    assert not psutil.pid_exists(instance.pid)  # reaped: no zombie left under the worker
