"""The worker's main process as a child subreaper (issue 16, item 8), without Celery: a stand-in pool process
starts a tagged llama-server in its own session and is killed; the llama-server comes to this process (a
subreaper, as the worker's main process is), and the OrphanReaper reaps it when it dies, with its exit code
in its log, where the reconcile pass reads it."""

import ctypes
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

from models_app import processes
from models_app.subreaper import PR_SET_CHILD_SUBREAPER, OrphanReaper

POOL_PROCESS = """
import subprocess, sys, time
env = {"LLAMACONTROLLER_INSTANCE_ID": "7", "LLAMACONTROLLER_INSTANCE_LOG": sys.argv[2]}
server = subprocess.Popen([sys.argv[1], "60"], env=env, start_new_session=True)
print(server.pid, flush=True)
time.sleep(60)
"""


@pytest.fixture
def subreaper_here():
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    yield
    libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def _until(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = condition()
        if result:
            return result
        time.sleep(0.05)
    raise AssertionError("not in time")


def test_a_llama_server_whose_pool_process_died_is_reaped_with_its_exit_code(
    subreaper_here, fake_llama, tmp_path, reap
):
    log = tmp_path / "testhost-instance-7.log"
    pool = subprocess.Popen(
        [sys.executable, "-c", POOL_PROCESS, fake_llama, str(log)], stdout=subprocess.PIPE, text=True
    )
    server_pid = int(pool.stdout.readline())
    reap.append(server_pid)
    reaper = OrphanReaper()
    assert reaper.scan() == []
    assert reaper.known[server_pid][1] == str(log)  # learnt while it runs: a dead one's tag cannot be read
    assert pool.pid in reaper.untagged

    pool.kill()
    pool.wait()
    _until(lambda: psutil.Process(server_pid).ppid() == os.getpid())  # ours now, not PID 1's
    assert reaper.scan() == []  # alive: nothing to reap
    assert processes.exit_code_of(server_pid, str(log), wait=0) is None

    os.kill(server_pid, signal.SIGKILL)
    assert _until(reaper.scan) == [(server_pid, -9)]
    assert processes.exit_code_of(server_pid, str(log), wait=0) == -9
    assert log.read_text().endswith(f"[llamacontroller] llama-server pid {server_pid} exited with code -9\n")
    assert not psutil.pid_exists(server_pid)  # no zombie left
    assert reaper.known == {}


def test_children_of_a_live_pool_process_are_left_to_it(fake_llama, tmp_path, reap):
    log = tmp_path / "testhost-instance-7.log"
    pool = subprocess.Popen(
        [sys.executable, "-c", POOL_PROCESS, fake_llama, str(log)], stdout=subprocess.PIPE, text=True
    )
    try:
        server_pid = int(pool.stdout.readline())
        reap.append(server_pid)
        reaper = OrphanReaper()
        reaper.scan()
        os.kill(server_pid, signal.SIGKILL)
        time.sleep(0.3)
        assert reaper.scan() == []  # its parent (the pool process) reaps it, not us
        assert psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE  # that stand-in never reaps
    finally:
        pool.kill()
        pool.wait()


def test_exit_code_of_waits_for_a_zombie_to_be_reaped(fake_llama, tmp_path, reap):
    """Between a llama-server's death and its reaping, the reconcile pass must not record a crash with no
    code: a zombie's code is waited for."""
    log = tmp_path / "testhost-instance-8.log"
    server = subprocess.Popen([fake_llama, "60"])
    reap.append(server.pid)
    server.kill()
    _until(lambda: psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE)

    def reap_later():
        time.sleep(0.5)
        processes._reap(server, log)  # as the launch's reaping thread does

    threading.Thread(target=reap_later).start()
    assert processes.exit_code_of(server.pid, str(log)) == -9


def test_one_that_died_before_any_scan_saw_it_is_reaped_by_its_launch_note(
    subreaper_here, fake_llama, tmp_path, reap
):
    """Re-parented and killed at once (a zombie: its environment is gone): the note launch() leaves by pid
    says which log is its."""
    log = tmp_path / "testhost-instance-9.log"
    pool = subprocess.Popen(
        [sys.executable, "-c", POOL_PROCESS, fake_llama, "/nonexistent/other.log"],
        stdout=subprocess.PIPE,
        text=True,
    )
    server_pid = int(pool.stdout.readline())
    reap.append(server_pid)
    processes._note_launch(server_pid, processes.create_time_of(server_pid), log)  # as launch() does
    pool.kill()
    pool.wait()
    _until(lambda: psutil.Process(server_pid).ppid() == os.getpid())
    os.kill(server_pid, signal.SIGKILL)
    _until(lambda: psutil.Process(server_pid).status() == psutil.STATUS_ZOMBIE)
    assert OrphanReaper().scan() == [(server_pid, -9)]  # the first scan ever
    assert processes.exit_code_of(server_pid, str(log), wait=0) == -9
    assert processes.launched_log(server_pid) is None  # the note is gone with the process


def test_the_exit_code_is_read_while_the_pid_is_still_a_zombie(fake_llama, tmp_path, reap):
    """The order that closes the race above: the code is read without reaping (WNOWAIT) and recorded, and
    only then is the zombie reaped, so the pid is never gone with no recorded code."""
    server = subprocess.Popen([fake_llama, "60"])
    reap.append(server.pid)
    assert processes.exit_code_keeping_zombie(server.pid) is None  # still running
    server.kill()
    assert processes.exit_code_keeping_zombie(server.pid, block=True) == -9
    assert psutil.Process(server.pid).status() == psutil.STATUS_ZOMBIE  # not reaped by reading its code
    processes._reap(server, tmp_path / "x.log")
    assert not psutil.pid_exists(server.pid)
    assert processes.exit_code_of(server.pid, str(tmp_path / "x.log"), wait=0) == -9
    assert processes.exit_code_keeping_zombie(1) is None  # not our child


def test_exit_code_of_reads_once_more_when_the_zombie_was_reaped_between_its_reads(monkeypatch):
    # CI (PostgreSQL pass, a loaded machine): the reaper recorded the code and reaped the pid between
    # exit_code_of's read of the log and its zombie check, and the crash was recorded with no code.
    reads = iter([None, -9])
    monkeypatch.setattr(processes, "_recorded_exit_code", lambda pid, log_path: next(reads))
    monkeypatch.setattr(processes, "_is_zombie", lambda pid: False)  # reaped meanwhile
    assert processes.exit_code_of(12345, "/nonexistent.log") == -9
