"""Fixtures for the lifecycle unit tests: captured enqueues, a stand-in llama-server, process cleanup."""

import contextlib
import os
import shutil
import signal

import psutil
import pytest


@pytest.fixture
def fake_llama(tmp_path):
    """A copy of `sleep` named llama-server: a real process that looks like one to `ps` and psutil."""
    path = tmp_path / "bin" / "llama-server"
    path.parent.mkdir()
    shutil.copy(shutil.which("sleep"), path)
    return str(path)


@pytest.fixture
def reap():
    """Process groups to kill at teardown, whatever the test did."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(psutil.Error, ChildProcessError):
            psutil.Process(pid).wait(timeout=5)


@pytest.fixture
def no_stray_servers(settings):
    """Kill any llama-server a test started for this data folder (tagged with one of our log paths)."""
    yield
    from models_app import processes

    for pid, (_, log) in processes.tagged_processes().items():
        if log.startswith(str(settings.INSTANCE_LOG_DIR)):
            processes.stop_process(pid, None, timeout=2)


@pytest.fixture
def beat(django_capture_on_commit_callbacks):
    """One pass of the beat task on the default queue, with what it queues actually sent (to `sent`)."""

    def run_once():
        with django_capture_on_commit_callbacks(execute=True):
            from models_app import hosts

            return hosts.check_hosts()

    return run_once
