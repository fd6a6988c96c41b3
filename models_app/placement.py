"""Where a model loaded on demand goes. One function, `choose_gpus`, so that a smarter placement (one that
ranks GPU sets by a memory estimate) can replace it without touching its callers."""

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from gpus.models import Gpu, Host

from .models import InstanceGpu, LlamaBinary


def alive_since():
    """A host whose worker was heard of (GPU refresh, reconcile pass) after this is alive: three
    heartbeats may be missed, never less than 30 s."""
    beat = max(settings.GPU_REFRESH_SECONDS, settings.RECONCILE_SECONDS)
    return timezone.now() - timedelta(seconds=max(30, 3 * beat))


def _free_mib(gpu: Gpu) -> int:
    return gpu.memory_total_mib - (gpu.memory_used_mib or 0)


def _foreign(gpu: Gpu) -> str:
    named = [
        f"{p.get('name') or '?'} (pid {p.get('pid')}, {p.get('used_mib')} MiB)"
        for p in gpu.processes or []
        if p.get("owner") != "instance"
    ][:5]
    return ", ".join(named) or f"{gpu.memory_used_mib} MiB used by processes not visible here"


def choose_gpus(model, *, host: Host | None = None) -> tuple[Host, list[Gpu]]:
    """The GPU with the most free memory (total - used, so other people's processes count) among the GPUs of
    live hosts that can run the model (a default llama-server, or the model's pinned one), skipping GPUs
    that are unavailable, held by an active instance, or occupied by other people's processes (loading
    there needs an explicit force, which a request for a model cannot give). Raises NoCapacity naming
    the busy GPUs and what keeps them busy."""
    from .ondemand import NoCapacity, expires_at  # ondemand imports this module

    hosts = Host.objects.filter(last_seen__gte=alive_since())
    if host is not None:
        hosts = hosts.filter(pk=host.pk)
    if model.binary_id:
        hosts = hosts.filter(pk=model.binary.host_id)
    else:
        with_binary = LlamaBinary.objects.filter(is_default=True, error="").values("host_id")
        hosts = hosts.filter(pk__in=with_binary)
    gpus = list(
        Gpu.objects.filter(host__in=hosts, index__isnull=False)
        .select_related("host")
        .order_by("host__name", "index")
    )
    if not gpus:
        where = f"host {host.name}" if host is not None else "any host"
        raise NoCapacity(
            f"no GPU to load {model.pk} on: {where} has no live worker with a llama-server"
            + (f" ({model.binary.path} of {model.binary.host.name} is pinned)" if model.binary_id else "")
        )
    holders = {
        link.gpu_id: link.instance
        for link in InstanceGpu.objects.filter(gpu__in=gpus, active=True).select_related("instance__model")
    }
    free = [
        gpu
        for gpu in gpus
        if gpu.id not in holders and gpu.state not in (Gpu.State.UNAVAILABLE, Gpu.State.OCCUPIED_BY_OTHERS)
    ]
    if free:
        best = max(free, key=lambda gpu: (_free_mib(gpu), -gpus.index(gpu)))
        return best.host, [best]

    busy, soonest, freeing = [], None, False
    for gpu in gpus:
        where = f"GPU {gpu.index} on {gpu.host.name}"
        if gpu.id in holders:
            instance = holders[gpu.id]
            busy.append(f"{where}: {instance.model_id} (instance #{instance.pk}, {instance.status})")
            if instance.status == instance.Status.STOPPING:  # free within the stop timeout
                freeing = True
                expires = timezone.now() + timedelta(seconds=settings.STOP_TIMEOUT)
            else:
                expires = expires_at(instance)
            if expires is not None and (soonest is None or expires < soonest):
                soonest = expires
        elif gpu.state == Gpu.State.UNAVAILABLE:
            busy.append(f"{where}: unavailable ({gpu.state_reason or 'the GPU query failed'})")
        else:
            busy.append(f"{where}: other processes: {_foreign(gpu)}")
    retry_after = 60
    if soonest is not None:
        retry_after = max(1, min(3600, int((soonest - timezone.now()).total_seconds()) + 1))
    refusal = NoCapacity(f"no free GPU to load {model.pk} on: " + "; ".join(busy), retry_after=retry_after)
    refusal.freeing = freeing
    raise refusal
