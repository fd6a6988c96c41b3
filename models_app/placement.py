"""Where a model goes: `rank` orders the GPU sets of the live hosts by the memory left after the model's
estimate (models_app/estimates.py), single GPUs first, then the smallest set that fits, and says why;
`choose_gpus` (the gateway's load on demand) takes the first one, the load form and the API show the list."""

from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from gpus.models import Gpu, Host

from . import estimates, model_files
from .errors import Refused
from .estimates import gib
from .keepalive import expires_at
from .models import InstanceGpu, LlamaBinary


def _free_mib(gpu: Gpu) -> int:
    return gpu.memory_total_mib - (gpu.memory_used_mib or 0)


def _foreign(gpu: Gpu) -> str:
    named = [
        f"{p.get('name') or '?'} (pid {p.get('pid')}, {p.get('used_mib')} MiB)"
        for p in gpu.processes or []
        if p.get("owner") != "instance"
    ][:5]
    return ", ".join(named) or f"{gpu.memory_used_mib} MiB used by processes not visible here"


MAX_SET = 8  # the largest GPU set placement proposes (a load by hand may name more)
NO_GPU_RETRY_SECONDS = 60  # Retry-After when nothing says when a GPU frees


@dataclass
class Choice:
    """One GPU set with its prediction and the reason it ranks where it does."""

    host: Host
    gpus: list[Gpu]
    prediction: object  # estimates.Prediction
    shared: bool = False  # beside other people's processes
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.prediction.fits is not False

    @property
    def spare_mib(self) -> int:
        after = [a for a in self.prediction.free_after_mib if a is not None]
        return min(after) if after else 0

    def explain(self) -> str:
        where = f"GPU {self.prediction.gpu_label()} on {self.host.name}"
        p = self.prediction
        if p.estimate is None:
            return f"{where}: no estimate ({p.error}); {_free_text(self.gpus)}"
        if p.fits is None:
            return f"{where}: ≈ {gib(p.total_mib)}, free memory unknown"
        others = "".join(f"; {n}" for n in self.notes)
        if p.fits:
            return f"{where}: fits with {gib(self.spare_mib)} to spare (≈ {gib(p.total_mib)}){others}"
        return f"{where}: does not fit (≈ {gib(p.total_mib)}, {_free_text(self.gpus)}){others}"

    def as_dict(self) -> dict:
        return {
            "host": self.host.name,
            "gpu_ids": self.prediction.gpu_label(),
            "fits": self.prediction.fits,
            "estimated_mib": self.prediction.total_mib if self.prediction.estimate else None,
            "spare_mib": self.spare_mib if self.prediction.estimate else None,
            "shared_with_others": self.shared,
            "explanation": self.explain(),
            "summary": self.prediction.summary(),
        }


def _free_text(gpus: list[Gpu]) -> str:
    return ", ".join(f"GPU {g.index} {gib(_free_mib(g))} free" for g in gpus)


def _used_by_others(gpu: Gpu) -> str | None:
    foreign = [p for p in gpu.processes or [] if p.get("owner") != "instance"]
    if not foreign:
        return None
    total = sum(int(p.get("used_mib") or 0) for p in foreign)
    names = ", ".join(sorted({p.get("name") or "?" for p in foreign})[:3])
    return f"GPU {gpu.index}: {gib(total)} used by {names}"


def _candidate_gpus(model, host: Host | None):
    # Live hosts whose worker did not report the model's file unusable (no report yet: not ruled out).
    hosts = Host.objects.up().exclude(pk__in=model_files.hosts_without(model))
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
    holders = {
        link.gpu_id: link.instance
        for link in InstanceGpu.objects.filter(gpu__in=gpus, active=True).select_related("instance__model")
    }
    return gpus, holders


def _without_file(model, host: Host | None) -> list[str]:
    """Live hosts left out because their worker reported that it cannot serve the model, with the reason."""
    return [f"host {h.name}: {reason}" for h, reason in model_files.missing_on_live_hosts(model, host)]


def rank(model, *, host: Host | None = None, overrides: dict | None = None) -> tuple[list[Choice], list[str]]:
    """The GPU sets `model` may load on, best first, and why the other GPUs are out. Single GPUs that fit
    come first (idle ones before those shared with other people's processes, then by the memory left after
    the estimate); when no single GPU fits, the smallest set of a host's free GPUs that fits. GPU sets
    predicted not to fit follow, for the explanation. Hosts whose worker reported that it cannot serve the
    model (models_app/model_files.py) are left out, and said so."""
    gpus, holders = _candidate_gpus(model, host)
    out = _without_file(model, host)
    usable = []
    for gpu in gpus:
        where = f"GPU {gpu.index} on {gpu.host.name}"
        if gpu.id in holders:
            instance = holders[gpu.id]
            out.append(f"{where}: held by {instance.model_id} (instance #{instance.pk}, {instance.status})")
        elif gpu.state == Gpu.State.UNAVAILABLE:
            out.append(f"{where}: unavailable ({gpu.state_reason or 'the GPU query failed'})")
        else:
            usable.append(gpu)
    singles = []
    for gpu in usable:
        choice = Choice(gpu.host, [gpu], estimates.predict(model, [gpu], overrides))
        other = _used_by_others(gpu)
        if other or gpu.state == Gpu.State.OCCUPIED_BY_OTHERS:
            choice.shared = True
            choice.notes.append(
                other or f"GPU {gpu.index}: {gib(gpu.memory_used_mib or 0)} used by other processes"
            )
        singles.append(choice)

    def key(c: Choice):
        return (not c.fits, c.shared, -c.spare_mib if c.prediction.estimate else -_free_mib(c.gpus[0]))

    singles.sort(key=key)
    if any(c.fits for c in singles):
        return singles, out
    sets = []
    by_host: dict[int, list[Gpu]] = {}
    for gpu in usable:
        if gpu.state != Gpu.State.OCCUPIED_BY_OTHERS:
            by_host.setdefault(gpu.host_id, []).append(gpu)
    for host_gpus in by_host.values():
        host_gpus.sort(key=lambda g: -_free_mib(g))
        for size in range(2, min(len(host_gpus), MAX_SET) + 1):
            chosen = sorted(host_gpus[:size], key=lambda g: g.index)
            choice = Choice(chosen[0].host, chosen, estimates.predict(model, chosen, overrides))
            if choice.fits:
                sets.append(choice)
                break
    sets.sort(key=lambda c: (len(c.gpus), -c.spare_mib))
    return sets + singles, out


def choose_gpus(model, *, host: Host | None = None) -> tuple[Host, list[Gpu]]:
    """The first of `rank`: the single GPU with the most memory left after the model's estimate (idle GPUs
    before those shared with other people's processes), else the smallest set of one host's GPUs that fits.
    GPUs that are unavailable or held by an instance are skipped; a GPU occupied by others is used only
    when the model is predicted to fit beside them. Raises Refused (busy, field gpu_id) naming the busy GPUs
    and what keeps them busy, with the numbers, a Retry-After (the soonest a GPU frees) and `freeing` when
    one of them is being unloaded."""
    gpus, holders = _candidate_gpus(model, host)
    if not gpus:
        without_file = _without_file(model, host)
        where = f"host {host.name}" if host is not None else "any host"
        raise Refused(
            f"no GPU to load {model.pk} on: {where} has no live worker with a llama-server"
            + (f" ({model.binary.path} of {model.binary.host.name} is pinned)" if model.binary_id else "")
            + (" that has the model file (" + "; ".join(without_file) + ")" if without_file else ""),
            code="busy",
            field="gpu_id",
            retry_after=NO_GPU_RETRY_SECONDS,
        )
    choices, _ = rank(model, host=host)
    fitting = [c for c in choices if c.fits]
    if fitting:
        return fitting[0].host, fitting[0].gpus

    by_gpu = {c.gpus[0].pk: c for c in choices if len(c.gpus) == 1}
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
            choice = by_gpu.get(gpu.pk)
            numbers = ""
            if choice is not None and choice.prediction.estimate is not None:
                free = choice.prediction.free_mib[0]
                numbers = f" (needs ≈ {choice.prediction.total_mib} MiB, {free} MiB free)"
            if gpu.state == Gpu.State.OCCUPIED_BY_OTHERS or _used_by_others(gpu):
                busy.append(f"{where}: other processes: {_foreign(gpu)}{numbers}")
            else:
                busy.append(f"{where}: too little memory{numbers}")
    retry_after = NO_GPU_RETRY_SECONDS
    if soonest is not None:
        retry_after = max(1, min(3600, int((soonest - timezone.now()).total_seconds()) + 1))
    busy += [f"{note} (no model file)" for note in _without_file(model, host)]
    raise Refused(
        f"no free GPU to load {model.pk} on: " + "; ".join(busy),
        code="busy",
        field="gpu_id",
        retry_after=retry_after,
        freeing=freeing,
    )
