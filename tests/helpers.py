"""Helpers shared by tests: instance rows and processes that stand in for llama-server."""

import contextlib
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import httpx
import psutil
import pytest
from django.utils import timezone

from gpus.models import Host
from llamacontroller_site.embedded_redis import free_port
from models_app.errors import Refused
from models_app.models import GpuInstance, InstanceGpu


def running_instance(host, model, gpus, pid=None):
    create_time = psutil.Process(pid).create_time() if pid else None
    instance = GpuInstance.objects.create(
        model=model,
        host=host,
        gpu_ids=",".join(str(g.index) for g in gpus),
        status=GpuInstance.Status.RUNNING,
        pid=pid,
        process_create_time=create_time,
        loaded_at=timezone.now(),
    )
    for position, gpu in enumerate(gpus):
        InstanceGpu.objects.create(instance=instance, gpu=gpu, position=position)
    return instance


def grow(child):
    child.stdin.write("more\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "grew"


def register_second_host(name: str, gpu_file, settings, *, default_binary: bool = True):
    """Another live host with two fake GPUs of its own (its own uuids, written to `gpu_file`), registered as
    its worker would; with `default_binary`, it (and every other host) gets a default llama-server row so that
    placement considers it. The fake_gpus fixture's file stays this process's telemetry."""
    import json

    from gpus import services
    from gpus.models import Host
    from models_app.models import LlamaBinary
    from tests.conftest import write_fake_gpu_file

    data = json.loads(write_fake_gpu_file(gpu_file).read_text())
    for gpu in data["gpus"]:
        gpu["uuid"] = f"GPU-{name}-{gpu['index']}"
    gpu_file.write_text(json.dumps(data))
    own_file, settings.FAKE_GPUS_FILE = settings.FAKE_GPUS_FILE, str(gpu_file)
    try:
        host = services.register_host(name)
    finally:
        settings.FAKE_GPUS_FILE = own_file
    if default_binary:
        for each in Host.objects.exclude(llama_binaries__is_default=True):
            LlamaBinary.objects.create(
                host=each,
                name="default",
                path=f"/opt/{each.name}/llama-server",
                is_default=True,
                version="b1",
            )
    return host


def wait_for(instance, *statuses, timeout=30.0):
    """Until the instance's status is one of `statuses` (returned, refreshed); else AssertionError."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instance.refresh_from_db()
        if instance.status in statuses:
            return instance
        time.sleep(0.05)
    raise AssertionError(f"instance #{instance.pk} is {instance.status}, not {statuses}: {instance.error}")


def wait_until(check, timeout=30.0, what="condition"):
    """Until `check()` is truthy (its value is returned); else AssertionError naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


# The run command's collectstatic (first_run.collect_static: under the checkout's lock), as a command line.
COLLECT_STATIC = [
    sys.executable, "manage.py", "shell", "-c",
    "from llamacontroller_site.first_run import collect_static; collect_static()",
]  # fmt: skip


@contextlib.contextmanager
def web_server(env: dict, log_path, *, workers: int = 1, timeout: float = 30.0, access_log: bool = True):
    """The web server as `./lc.sh run` starts it (runner.web_command: gunicorn with uvicorn workers) on a free
    port, with `env`; yields its base URL once /api/version answers, and stops it on the way out."""
    from llamacontroller_site.runner import REPO, web_command

    port = free_port()
    argv = web_command(Path(sys.executable).parent, bind=f"127.0.0.1:{port}", workers=workers)
    if not access_log:
        argv[argv.index("--access-logfile") + 1] = "/dev/null"
    with open(log_path, "wb") as log:
        web = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if httpx.get(url + "/api/version", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if web.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the web server did not answer: {Path(log_path).read_text()[-3000:]}")
            time.sleep(0.1)
        yield url
    finally:
        web.terminate()
        try:
            web.wait(15)
        except subprocess.TimeoutExpired:
            web.kill()
            web.wait()


def age_events(instance, seconds):
    """Move the instance's events `seconds` into the past (a resend waits on the age of the last one)."""
    instance.events.update(created_at=timezone.now() - timedelta(seconds=seconds))


def keep_host_up(host):
    Host.objects.filter(pk=host.pk).update(last_seen=timezone.now())


@contextlib.contextmanager
def refused(code: str, match: str | None = None):
    """pytest.raises for a Refused with this reason code (its `.value` is the refusal)."""
    with pytest.raises(Refused, match=match) as caught:
        yield caught
    assert caught.value.code == code, (caught.value.code, caught.value.message)


def callers_at_once(model, user, callers: int, timeout: float):
    """`callers` threads ask ondemand.ensure_running for `model` at the same moment (each with its own database
    connection). Returns the started threads and the lists their instance ids and exceptions go to."""
    import threading

    from django.db import connection

    from models_app import ondemand

    results, errors = [], []
    barrier = threading.Barrier(callers)

    def call():
        try:
            barrier.wait()
            results.append(ondemand.ensure_running(model, user, timeout=timeout).pk)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=call) for _ in range(callers)]
    for thread in threads:
        thread.start()
    return threads, results, errors
