"""Helpers shared by tests: instance rows and processes that stand in for llama-server."""

import time

import psutil
from django.utils import timezone

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
