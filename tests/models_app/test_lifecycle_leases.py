"""Every failure ends in a definite state, quickly: leases, unexpected errors, capped resends, unloads that
race a start, stops that fail."""

import os
import socket
import sys
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from models_app import hosts, launch, processes, reconcile, stop, tasks
from models_app.models import GpuInstance, InstanceEvent
from models_app.services import request_load, request_unload

Status = GpuInstance.Status
Kind = InstanceEvent.Kind

# A stand-in llama-server: answers GET /health with 200 on the port given as its first argument.
HEALTHY_SERVER = """
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer
class H(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200 if self.path == "/health" else 404)
        self.end_headers()
    def log_message(self, *args):
        pass
HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""


@pytest.fixture
def run(django_capture_on_commit_callbacks):
    def run_once():
        with django_capture_on_commit_callbacks(execute=True):
            return reconcile.reconcile_host("testhost")

    return run_once


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _starting(fake_gpus, argv, reap, *, lease_seconds: float, port=None, age=0):
    """A `starting` instance whose process runs, with a lease ending `lease_seconds` from now."""
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    log = launch.log_path_for(instance)
    pid, create_time = processes.launch(
        argv, env=launch.instance_env(instance, [fake_gpus.gpus[0].uuid], log), log_path=log
    )
    reap.append(pid)
    GpuInstance.objects.filter(pk=instance.pk).update(
        status=Status.STARTING,
        pid=pid,
        process_create_time=create_time,
        log_path=str(log),
        port=port,
        lease_expires_at=timezone.now() + timedelta(seconds=lease_seconds),
        requested_at=timezone.now() - timedelta(seconds=age),
    )
    instance.events.update(created_at=timezone.now() - timedelta(seconds=age))
    instance.refresh_from_db()
    return instance


def _wait_health(port, timeout=10):
    deadline = time.monotonic() + timeout
    while processes.health_status(port) != 200:
        assert time.monotonic() < deadline, "stand-in server did not come up"
        time.sleep(0.02)


# --- leases ---------------------------------------------------------------------------------------------


def test_lease_abandoned_healthy_start_runs_at_once(run, fake_gpus, tiny_model, reap, sent):
    """Seen: the worker died mid-load, llama-server came up, and the instance stayed `starting` until
    LOAD_TIMEOUT. Now the pass after the lease runs out adopts it."""
    port = _free_port()
    instance = _starting(
        fake_gpus, [sys.executable, "-c", HEALTHY_SERVER, str(port)], reap, lease_seconds=30, port=port
    )
    _wait_health(port)
    assert run() == {}  # the lease is held: somebody watches this start
    assert GpuInstance.objects.get(pk=instance.pk).status == Status.STARTING
    GpuInstance.objects.filter(pk=instance.pk).update(lease_expires_at=timezone.now())
    assert run() == {"adopted": 1}  # 2 seconds after the start, not LOAD_TIMEOUT
    instance.refresh_from_db()
    assert instance.status == Status.RUNNING
    assert instance.lease_expires_at is None
    assert "adopted: its worker was lost" in instance.events.get(kind=Kind.HEALTHY).detail
    # Adopted healthy, as adopted still loading: an ADOPTED event first (the timeline's order).
    kinds = list(instance.events.order_by("id").values_list("kind", flat=True))
    assert kinds.index(Kind.ADOPTED) == kinds.index(Kind.HEALTHY) - 1
    assert sent == []


def test_lease_abandoned_dead_start_fails(run, fake_gpus, tiny_model, reap, sent):
    instance = _starting(fake_gpus, [sys.executable, "-c", "exit(3)"], reap, lease_seconds=-1)
    deadline = time.monotonic() + 10
    while processes.is_alive(instance.pid, instance.process_create_time) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert run() == {"failed": 1}
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert "exited while loading, and the worker that started it was lost" in instance.error
    assert not instance.gpu_links.filter(active=True).exists()


def test_lease_abandoned_loading_start_is_watched_again(run, fake_gpus, tiny_model, fake_llama, reap, sent):
    instance = _starting(fake_gpus, [fake_llama, "60"], reap, lease_seconds=-1, port=_free_port())
    assert run() == {"adopted": 1}
    assert sent == [("resume_start", [instance.pk], {"queue": "host.testhost"})]
    instance.refresh_from_db()
    assert instance.lease_expires_at > timezone.now()  # taken over for the new watcher
    assert run() == {}  # not sent twice while the new watcher holds the lease
    assert len(sent) == 1


def test_lease_abandoned_start_past_load_timeout_fails(
    run, fake_gpus, tiny_model, fake_llama, reap, settings
):
    settings.LOAD_TIMEOUT = 5
    instance = _starting(fake_gpus, [fake_llama, "60"], reap, lease_seconds=-1, port=_free_port(), age=10)
    assert run() == {"failed": 1}
    instance.refresh_from_db()
    assert instance.error.startswith("llama-server did not answer /health with 200 within 5s")
    assert not processes.is_alive(instance.pid, instance.process_create_time)


def test_lease_held_while_loading_and_cleared_after(
    fake_gpus, tiny_model, llama_server_path, settings, no_stray_servers, monkeypatch
):
    settings.LLAMA_SERVER = str(llama_server_path)
    seen = []
    real = launch.renew_lease

    def spy(instance, status=Status.STARTING):
        renewed = real(instance, status)
        seen.append(GpuInstance.objects.get(pk=instance.pk).lease_expires_at)
        return renewed

    monkeypatch.setattr(launch, "renew_lease", spy)
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    tasks.load_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.RUNNING, instance.error
    assert seen and all(lease > timezone.now() - timedelta(seconds=5) for lease in seen)
    assert instance.lease_expires_at is None
    tasks.unload_model(instance.pk)
    instance.refresh_from_db()
    assert (instance.status, instance.lease_expires_at) == (Status.STOPPED, None)


# --- unexpected errors and resends -------------------------------------------------------------------


def test_unexpected_error_in_load_fails_the_instance(
    fake_gpus, tiny_model, llama_server_path, settings, monkeypatch, no_stray_servers
):
    """Seen: a registry entry with a bad flag made reconcile re-send the load every 10 s without end."""
    settings.LLAMA_SERVER = str(llama_server_path)

    def broken(*args, **kwargs):
        raise ValueError("llama-server has no flag 'ngll'")

    monkeypatch.setattr(launch, "build_argv", broken)
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    tasks.load_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.error == "unexpected error: ValueError: llama-server has no flag 'ngll'"
    assert instance.lease_expires_at is None
    assert not instance.gpu_links.filter(active=True).exists()


def test_unexpected_error_in_unload_fails_the_instance(fake_gpus, tiny_model, monkeypatch):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    request_unload(instance=instance, actor=None)

    def broken(instance):
        raise RuntimeError("/proc is gone")

    monkeypatch.setattr(stop, "find_tagged", broken)
    tasks.unload_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.error == "unexpected error: RuntimeError: /proc is gone"


def _age(instance, seconds):
    instance.events.update(created_at=timezone.now() - timedelta(seconds=seconds))


def test_pending_load_is_resent_a_few_times_then_fails(
    fake_gpus, tiny_model, sent, django_capture_on_commit_callbacks
):
    def beat():  # resends are beat's (the default queue's), not the host's own pass (models_app/hosts.py)
        with django_capture_on_commit_callbacks(execute=True):
            return hosts.check_hosts()

    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    for n in range(1, reconcile.MAX_RESENDS + 1):
        _age(instance, 1000)
        assert beat() == {"resent": 1}
        assert len(sent) == n
        assert beat() == {}  # the next resend waits longer
    _age(instance, 1000)
    assert beat() == {"failed": 1}
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.error.startswith(
        f"host testhost did not take the load (sent {reconcile.MAX_RESENDS + 1} times to host.testhost"
    )
    assert instance.events.filter(detail__contains="no worker took the load (3 of 3)").exists()
    assert not instance.gpu_links.filter(active=True).exists()


def test_start_lost_before_launch_is_restarted_a_few_times_then_fails(run, fake_gpus, tiny_model, sent):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    for _ in range(reconcile.MAX_RESENDS):
        GpuInstance.objects.filter(pk=instance.pk).update(
            status=Status.STARTING, lease_expires_at=timezone.now()
        )
        assert run() == {"reloaded": 1}
    GpuInstance.objects.filter(pk=instance.pk).update(status=Status.STARTING, lease_expires_at=timezone.now())
    assert run() == {"failed": 1}
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert "the worker did not take the load" in instance.error


def test_abandoned_unload_is_resent_then_done_by_reconcile(
    run, fake_gpus, tiny_model, fake_llama, reap, sent
):
    instance = _starting(fake_gpus, [fake_llama, "60"], reap, lease_seconds=-1)
    GpuInstance.objects.filter(pk=instance.pk).update(status=Status.STOPPING)
    for _ in range(reconcile.MAX_RESENDS):
        _age(instance, 1000)
        assert run() == {"resent": 1}
    _age(instance, 1000)
    assert run() == {"stopped": 1}
    instance.refresh_from_db()
    assert instance.status == Status.STOPPED
    assert not processes.is_alive(instance.pid, instance.process_create_time)


# --- unloads that race a start, stops that fail --------------------------------------------------------


@pytest.mark.parametrize("when", ["before launch", "after launch"])
def test_unload_racing_the_launch_leaves_no_process(
    fake_gpus, tiny_model, llama_server_path, settings, monkeypatch, no_stray_servers, when
):
    """An unload that runs between the launch and the recording of the pid still stops the process."""
    settings.LLAMA_SERVER = str(llama_server_path)
    real_launch = launch.launch
    launched = []

    def racing_launch(argv, *, env, log_path):
        if when == "before launch":
            stop.unload_instance(instance.pk)  # another worker process: finds nothing to stop yet
        pid, create_time = real_launch(argv, env=env, log_path=log_path)
        launched.append((pid, create_time))
        if when == "after launch":
            stop.unload_instance(instance.pk)
        return pid, create_time

    monkeypatch.setattr(launch, "launch", racing_launch)
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    tasks.load_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.STOPPED
    assert instance.pid is None
    [(pid, create_time)] = launched
    deadline = time.monotonic() + 10
    while processes.is_alive(pid, create_time) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not processes.is_alive(pid, create_time)


def _running_sleeper(fake_gpus, fake_llama, reap):
    instance = _starting(fake_gpus, [fake_llama, "60"], reap, lease_seconds=-1)
    GpuInstance.objects.filter(pk=instance.pk).update(status=Status.RUNNING, lease_expires_at=None)
    instance.refresh_from_db()
    return instance


def test_unload_permission_error_ends_failed(fake_gpus, tiny_model, fake_llama, reap, monkeypatch):
    instance = _running_sleeper(fake_gpus, fake_llama, reap)

    def refuse(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(processes.os, "killpg", refuse)
    monkeypatch.setattr(processes.os, "kill", refuse)
    request_unload(instance=instance, actor=None)
    tasks.unload_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.error == (
        f"could not stop llama-server: not allowed to stop pid {instance.pid}: Operation not permitted"
    )
    monkeypatch.undo()
    assert processes.is_alive(instance.pid, instance.process_create_time)  # said so, not hidden
    os.killpg(instance.pid, 9)


def test_unload_marks_stopped_only_when_the_process_is_gone(
    fake_gpus, tiny_model, fake_llama, reap, monkeypatch
):
    instance = _running_sleeper(fake_gpus, fake_llama, reap)
    monkeypatch.setattr(stop, "stop_process", lambda pid, create_time, timeout=None, **kwargs: False)
    tasks.unload_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.error == f"could not stop llama-server: pid {instance.pid} survived SIGKILL"
