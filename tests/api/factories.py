"""Rows for API and web tests, written directly (no worker): hosts with N GPUs, instances holding GPUs."""

from gpus.models import Gpu, Host
from models_app.models import GpuInstance, InstanceGpu


def make_gpus(count: int, host_name: str = "testhost", **fields) -> list[Gpu]:
    host, _ = Host.objects.get_or_create(name=host_name)
    start = host.gpus.count()
    return [
        Gpu.objects.create(
            host=host,
            index=start + i,
            uuid=f"GPU-{host_name}-{start + i}",
            name="Simulated RTX 4090",
            simulated=True,
            memory_total_mib=24564,
            memory_used_mib=10,
            **fields,
        )  # fmt: skip
        for i in range(count)
    ]


def make_instance(gpus, model, owner=None, status=GpuInstance.Status.RUNNING, **fields) -> GpuInstance:
    """An instance on `gpus` (one host), with its GPU claims; GPUs it holds are marked model_loaded."""
    active = status in GpuInstance.ACTIVE_STATUSES
    host = gpus[0].host
    defaults = {
        "port": 9000 + GpuInstance.objects.count() if active else None,
        "pid": 4242,
        "memory_used_mb": 5123,
        "memory_total_mb": sum(g.memory_total_mib for g in gpus),
        "memory_source": GpuInstance.MemorySource.PROCESS,
    }
    defaults.update(fields)
    instance = GpuInstance.objects.create(
        model=model,
        host=host,
        gpu_ids=",".join(str(g.index) for g in gpus),
        status=status,
        owner=owner,
        **defaults,
    )
    for position, gpu in enumerate(gpus):
        InstanceGpu.objects.create(instance=instance, gpu=gpu, position=position, active=active)
        if active:
            Gpu.objects.filter(pk=gpu.pk).update(state=Gpu.State.MODEL_LOADED)
    return instance


def make_cluster(model, owner=None, start: int = 0, count: int = 2, gpus_per_host: int = 2) -> list[Host]:
    """Hosts box-<start>… with `gpus_per_host` GPUs each (and one replaced GPU, which lists skip): even ones
    up with a running and a stopping instance, odd ones down (silent for an hour) with their instances
    `unknown`."""
    from datetime import timedelta

    from django.utils import timezone

    hosts = []
    for n in range(start, start + count):
        down = n % 2 == 1
        host = Host.objects.create(
            name=f"box-{n}",
            last_seen=timezone.now() - timedelta(hours=1 if down else 0),
            worker_hostname=f"node{n}.example",
            worker_pid=1000 + n,
            address=f"10.0.0.{n + 1}",
        )
        gpus = make_gpus(gpus_per_host, host_name=host.name)
        Gpu.objects.create(host=host, index=None, uuid=f"GPU-{host.name}-replaced", name="Old card")
        make_instance([gpus[0]], model, owner=owner, status="unknown" if down else "running")
        make_instance([gpus[1]], model, owner=owner, status="unknown" if down else "stopping")
        hosts.append(host)
    return hosts
