"""The model lifecycle end to end: real Redis, a real Celery worker, the real llama-server, the tiny model and
the simulated GPUs. Covers the seed's five scenarios, crashes, a killed worker, failures and parallel loads."""

import ctypes
import json
import os
import signal
import socket
import stat
import threading
import time

import psutil
import pytest
import requests
from django.core.management import call_command
from django.db import connection

from gpus.models import Gpu
from models_app import processes, tasks
from models_app.errors import Refused
from models_app.memory import refresh_host_memory
from models_app.models import GpuInstance, InstanceEvent, LlamaBinary
from models_app.services import request_load, request_switch, request_unload
from tests.helpers import wait_for, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Status = GpuInstance.Status


# --- helpers ---------------------------------------------------------------------------------------------


def our_servers(settings) -> dict[int, int]:
    """pid -> instance id of every live llama-server started for this test run's data folder."""
    prefix = str(settings.INSTANCE_LOG_DIR)
    return {pid: iid for pid, (iid, log) in processes.tagged_processes().items() if log.startswith(prefix)}


def ps_output() -> str:
    from io import StringIO

    out = StringIO()
    call_command("ps", stdout=out)
    return out.getvalue()


def unload_and_check(instance, settings):
    request_unload(instance=instance, actor=None)
    wait_for(instance, Status.STOPPED)
    assert not processes.is_alive(instance.pid, instance.process_create_time)
    assert instance.pid not in our_servers(settings)
    return instance


@pytest.fixture
def worker(celery_worker, settings):
    yield celery_worker
    # Whatever a test left (it should have unloaded): stop it, so no process outlives the test.
    for pid in our_servers(settings):
        processes.stop_process(pid, None, timeout=2)


@pytest.fixture
def ticker():
    """Stands in for celery beat: sends the reconcile fan-out every RECONCILE_SECONDS."""
    stop = threading.Event()

    def start(seconds: float):
        def run():
            while not stop.wait(seconds):
                tasks.dispatch_reconcile.apply_async()

        threading.Thread(target=run, daemon=True).start()

    yield start
    stop.set()


# --- the seed's five scenarios ---------------------------------------------------------------------------


def test_lifecycle_seed_1_single_gpu_memory(worker, fake_gpus, tiny_model, users, settings):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    wait_for(instance, Status.RUNNING, Status.FAILED)
    assert instance.status == Status.RUNNING, instance.error
    instance = wait_for(instance, Status.RUNNING)
    wait_until(
        lambda: GpuInstance.objects.get(pk=instance.pk).memory_updated_at, what="post-load memory query"
    )
    instance.refresh_from_db()
    assert instance.memory_source == "process"
    assert 0 < instance.memory_used_mb < instance.memory_total_mb == fake_gpus.gpus[0].memory_total_mib
    assert instance.memory_percent == round(instance.memory_used_mb * 100 / instance.memory_total_mb, 1)
    line = next(line for line in ps_output().splitlines() if line.startswith(str(instance.pk)))
    assert (
        f"{instance.memory_used_mb} MiB / {instance.memory_total_mb} MiB ({instance.memory_percent}%)" in line
    )
    assert "running" in line and "operator" in line
    # The memory event is written just after the figures it reports: wait for it, not for the figures.
    memory_event = wait_until(
        lambda: instance.events.filter(kind=InstanceEvent.Kind.MEMORY).first(), 10, "the memory event"
    )
    assert f"Model tiny loaded on GPU 0: {instance.memory_used_mb} MiB / {instance.memory_total_mb} MiB" in (
        memory_event.detail
    )
    assert our_servers(settings) == {instance.pid: instance.pk}
    unload_and_check(instance, settings)


def test_lifecycle_seed_2_multi_gpu_memory_is_summed(worker, fake_gpus, tiny_model, settings):
    instance = request_load(model_id="tiny", gpu_spec="0,1", actor=None)
    instance = wait_for(instance, Status.RUNNING, Status.FAILED)
    assert instance.status == Status.RUNNING, instance.error
    assert instance.argv[-2:] == ["--split-mode", "layer"]
    wait_until(
        lambda: GpuInstance.objects.get(pk=instance.pk).memory_updated_at, what="post-load memory query"
    )
    instance.refresh_from_db()
    gpus = list(Gpu.objects.filter(host=fake_gpus.host).order_by("index"))
    assert instance.memory_total_mb == sum(g.memory_total_mib for g in gpus)
    per_gpu = [sum(p["used_mib"] for p in g.processes if p["instance_id"] == instance.pk) for g in gpus]
    assert all(share > 0 for share in per_gpu)
    assert instance.memory_used_mb == sum(per_gpu)
    assert {g.state for g in gpus} == {"model_loaded"}
    unload_and_check(instance, settings)


def test_lifecycle_seed_3_refresh_updates_and_nothing_stale_after_unload(
    worker, fake_gpus, tiny_model, settings
):
    instance = wait_for(request_load(model_id="tiny", gpu_spec="1", actor=None), Status.RUNNING)
    wait_until(
        lambda: GpuInstance.objects.get(pk=instance.pk).memory_updated_at, what="post-load memory query"
    )
    instance.refresh_from_db()
    first = instance.memory_updated_at
    refresh_host_memory("testhost")  # a dashboard refresh: the same code the beat task runs
    instance.refresh_from_db()
    assert instance.memory_updated_at > first
    assert 0 < instance.memory_used_mb < instance.memory_total_mb

    unload_and_check(instance, settings)
    # The unload refreshes the host right after it marks the instance stopped (no beat runs here): GPU 1 is
    # idle again, with no process of the instance. (Read at once, the row could predate that refresh.)
    wait_until(
        lambda: Gpu.objects.get(host=fake_gpus.host, index=1).state == "idle", 10, "the unload's refresh"
    )
    gpu = Gpu.objects.get(host=fake_gpus.host, index=1)
    assert not [p for p in gpu.processes if p["pid"] == instance.pid]
    assert gpu.memory_used_mib < settings.GPU_BUSY_MIB
    assert str(instance.pk) not in [line.split()[0] for line in ps_output().splitlines()[1:]]


def test_lifecycle_seed_4_telemetry_failure_during_load(worker, fake_gpus, tiny_model, settings):
    fake_gpus.write(fail="simulated driver failure")
    instance = wait_for(
        request_load(model_id="tiny", gpu_spec="0", actor=None), Status.RUNNING, Status.FAILED
    )
    assert instance.status == Status.RUNNING, instance.error
    wait_until(
        lambda: GpuInstance.objects.get(pk=instance.pk).events.filter(kind="memory").exists(),
        what="post-load memory query",
    )
    instance.refresh_from_db()
    assert instance.memory_source == "none"
    assert instance.memory_percent is None
    assert "N/A" in next(line for line in ps_output().splitlines() if line.startswith(str(instance.pk)))
    assert processes.health_status(instance.port) == 200  # the model serves regardless

    fake_gpus.write(fail=None)
    refresh_host_memory("testhost")
    instance.refresh_from_db()
    assert instance.memory_source == "process"
    assert 0 < instance.memory_used_mb < instance.memory_total_mb
    unload_and_check(instance, settings)


def test_lifecycle_seed_5_memory_after_inference(worker, fake_gpus, tiny_model, settings):
    instance = wait_for(request_load(model_id="tiny", gpu_spec="0", actor=None), Status.RUNNING)
    wait_until(
        lambda: GpuInstance.objects.get(pk=instance.pk).memory_updated_at, what="post-load memory query"
    )
    instance.refresh_from_db()
    before = instance.memory_used_mb
    for n in range(4):
        reply = requests.post(
            f"http://127.0.0.1:{instance.port}/completion",
            json={"prompt": f"Once upon a time {n}", "n_predict": 64},
            headers={"Authorization": f"Bearer {instance.api_key}"},  # only the controller may call it
            timeout=30,
        )
        assert reply.status_code == 200
        assert reply.json()["tokens_predicted"] > 0
    rss_mib = psutil.Process(instance.pid).memory_info().rss // (1024 * 1024)
    refresh_host_memory("testhost")
    instance.refresh_from_db()
    # The figure follows the process: after the requests it is what the process holds now, not the old one.
    assert instance.memory_used_mb >= before
    assert abs(instance.memory_used_mb - rss_mib) <= 2
    unload_and_check(instance, settings)


# --- crashes, killed workers, failures -------------------------------------------------------------------


def test_lifecycle_kill_9_llama_server_is_crashed_with_log_tail(
    worker, fake_gpus, tiny_model, settings, ticker
):
    ticker(settings.RECONCILE_SECONDS)
    instance = wait_for(request_load(model_id="tiny", gpu_spec="0", actor=None), Status.RUNNING)
    killed_at = time.monotonic()
    os.kill(instance.pid, signal.SIGKILL)
    wait_for(instance, Status.CRASHED, timeout=4 * settings.RECONCILE_SECONDS + 5)
    # Noticed within two reconcile intervals (plus the time a pass takes).
    assert time.monotonic() - killed_at <= 2 * settings.RECONCILE_SECONDS + 2
    assert instance.exit_code == -9
    assert "exited unexpectedly with code -9" in instance.error
    assert "last lines of the log" in instance.error and "llama" in instance.error
    assert not instance.gpu_links.filter(active=True).exists()
    assert our_servers(settings) == {}
    assert (
        psutil.Process(instance.pid).status() if psutil.pid_exists(instance.pid) else True
    )  # reaped, or gone


def test_lifecycle_restart_on_crash(worker, fake_gpus, tiny_model, settings, ticker):
    tiny_model.restart_on_crash = True
    tiny_model.save()
    ticker(settings.RECONCILE_SECONDS)
    instance = wait_for(request_load(model_id="tiny", gpu_spec="0", actor=None), Status.RUNNING)
    old_pid = instance.pid
    os.kill(old_pid, signal.SIGKILL)
    wait_until(lambda: GpuInstance.objects.get(pk=instance.pk).restart_count == 1, timeout=20, what="restart")
    instance = wait_until(
        lambda: (
            (i := GpuInstance.objects.get(pk=instance.pk)).status == Status.RUNNING and i.pid != old_pid and i
        ),
        timeout=30,
        what="running again",
    )
    kinds = list(instance.events.values_list("kind", flat=True))
    assert "crashed" in kinds and "restarting" in kinds
    assert our_servers(settings) == {instance.pid: instance.pk}
    unload_and_check(instance, settings)


def _set_child_subreaper(on: bool) -> None:
    """llama-servers of a killed worker are re-parented to us instead of PID 1 (which may not reap)."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(36, 1 if on else 0, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def test_lifecycle_worker_killed_mid_load_converges(
    start_worker, fake_gpus, tiny_model, llama_server_path, settings, tmp_path
):
    # A llama-server that takes two seconds to start (a wrapper that execs the real one: same pid), so that
    # the worker can be killed while it waits for /health.
    # Binaries come from the worker's configuration: the wrapper sits in an allowed folder.
    wrapper = tmp_path / "builds" / "llama-server-slow"
    wrapper.parent.mkdir()
    wrapper.write_text(f'#!/bin/sh\nsleep 2\nexec "{llama_server_path}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IXUSR)
    tiny_model.binary = LlamaBinary.objects.create(host=fake_gpus.host, name="slow", path=str(wrapper))
    tiny_model.save()
    settings.LLAMA_SERVER = str(llama_server_path)
    _set_child_subreaper(True)
    try:
        first = start_worker(LLAMACONTROLLER_LLAMA_SERVER_DIRS=str(wrapper.parent))
        instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
        wait_until(lambda: GpuInstance.objects.get(pk=instance.pk).pid, what="the process to start")
        instance.refresh_from_db()
        assert instance.status == Status.STARTING
        first.kill()
        assert processes.is_alive(instance.pid, instance.process_create_time)  # it outlives its worker

        start_worker(LLAMACONTROLLER_LLAMA_SERVER_DIRS=str(wrapper.parent))
        instance = wait_for(instance, Status.RUNNING, Status.FAILED, timeout=30)
        assert instance.status == Status.RUNNING, instance.error
        assert GpuInstance.objects.count() == 1
        assert our_servers(settings) == {instance.pid: instance.pk}  # no duplicate, no orphan
        assert instance.events.filter(kind=InstanceEvent.Kind.ADOPTED).exists()
        assert processes.health_status(instance.port) == 200
        unload_and_check(instance, settings)
        wait_until(lambda: not psutil.pid_exists(instance.pid) or _reaped(instance.pid), what="reaping")
    finally:
        _set_child_subreaper(False)


def _reaped(pid: int) -> bool:
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return not psutil.pid_exists(pid)


def test_lifecycle_bad_model_file_fails(worker, fake_gpus, tiny_model, settings):
    bad = settings.MODEL_DIRS[0] / "broken.gguf"
    bad.write_bytes(b"GGUF" + os.urandom(4096))
    tiny_model.path = str(bad)
    # The registry agrees with the file's size: otherwise the host's file check (sent when the row is saved)
    # may refuse the load first ("is 4100 bytes there, the registry says 470080"), and this test is about
    # llama-server failing on the file's content.
    tiny_model.file_size_bytes = bad.stat().st_size
    tiny_model.save()
    instance = wait_for(
        request_load(model_id="tiny", gpu_spec="0", actor=None), Status.FAILED, Status.RUNNING
    )
    assert instance.status == Status.FAILED
    assert instance.error.startswith("llama-server exited while loading (exit code 1)")
    assert "last lines of the log" in instance.error
    assert our_servers(settings) == {}


def test_lifecycle_missing_binary_fails(worker, fake_gpus, tiny_model, tmp_path, settings):
    tiny_model.binary = LlamaBinary.objects.create(
        host=fake_gpus.host, name="missing", path=str(tmp_path / "llama-server")
    )
    tiny_model.save()
    instance = wait_for(
        request_load(model_id="tiny", gpu_spec="0", actor=None), Status.FAILED, Status.RUNNING
    )
    assert instance.error == f"llama-server not found at {tmp_path / 'llama-server'}"
    assert our_servers(settings) == {}


def test_lifecycle_exhausted_port_range_fails(
    start_worker, fake_gpus, tiny_model, llama_server_path, settings
):
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        settings.LLAMA_SERVER = str(llama_server_path)
        start_worker(LLAMACONTROLLER_PORT_RANGE=f"{port}-{port}")
        instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
        instance = wait_for(instance, Status.FAILED, Status.RUNNING)
    finally:
        busy.close()
    assert instance.error.startswith(f"no free port in {port}-{port}")
    assert our_servers(settings) == {}


# --- switch and concurrency ------------------------------------------------------------------------------


def test_lifecycle_switch_through_the_worker(worker, fake_gpus, tiny_model, settings):
    old = wait_for(request_load(model_id="tiny", gpu_spec="0", actor=None), Status.RUNNING)
    new = request_switch(model_id="tiny", gpu_spec="0", actor=None)
    new = wait_for(new, Status.RUNNING, Status.FAILED)
    assert new.status == Status.RUNNING, new.error
    wait_for(old, Status.STOPPED)
    assert our_servers(settings) == {new.pid: new.pk}
    unload_and_check(new, settings)


def test_lifecycle_parallel_loads_start_exactly_one(worker, fake_gpus, tiny_model, users, settings):
    results: list = []
    barrier = threading.Barrier(8)

    def load(n):
        barrier.wait()
        try:
            results.append(
                request_load(model_id="tiny", gpu_spec="0" if n % 2 else "1,0", actor=users["operator"])
            )
        except Refused as exc:
            results.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=load, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    started = [r for r in results if isinstance(r, GpuInstance)]
    refused = [r for r in results if isinstance(r, Refused)]
    assert len(started) == 1
    assert len(refused) == 7
    assert {r.code for r in refused} == {"busy"}
    assert all("tiny already runs on GPU" in r.message for r in refused)  # the same model twice
    instance = wait_for(started[0], Status.RUNNING)
    assert GpuInstance.objects.count() == 1
    assert our_servers(settings) == {instance.pid: instance.pk}
    unload_and_check(instance, settings)


def test_lifecycle_cli_load_ps_unload(worker, fake_gpus, tiny_model, users, settings):
    from io import StringIO

    from django.core.management.base import CommandError

    out = StringIO()
    call_command("load", "tiny", "--gpu", "0", "--wait", "--user", "operator", stdout=out)
    instance = GpuInstance.objects.get()
    assert f"#{instance.pk} tiny on testhost GPU 0: running on port {instance.port}" in out.getvalue()
    header = ps_output().splitlines()[0].split()
    assert header == ["ID", "MODEL", "HOST", "GPUS", "PORT", "STATUS", "UPTIME", "MEMORY", "OWNER"]
    with pytest.raises(CommandError, match="tiny already runs on GPU 0"):
        call_command("load", "tiny", "--gpu", "0")
    with pytest.raises(CommandError, match="may not unload"):
        call_command("unload", "--gpu", "0", "--user", "operator2")
    with pytest.raises(CommandError, match="not a number"):
        call_command("load", "tiny", "--gpu", "a")
    call_command("unload", "--gpu", "0", "--wait", stdout=out)
    instance.refresh_from_db()
    assert instance.status == Status.STOPPED
    assert json.dumps(our_servers(settings)) == "{}"
