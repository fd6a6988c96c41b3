"""Helpers shared by tests: instance rows and processes that stand in for llama-server."""

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
