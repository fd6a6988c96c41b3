"""Where a model goes: `rank` orders the GPU sets of the live hosts by the memory its claim leaves beside the
claims already there (models_app/claims.py, admission.py), single GPUs first, then the smallest set that fits,
and says why; `choose_gpus` (the gateway's load on demand, a load without GPUs) takes the first one, the load
form and the API show the list. LLAMACONTROLLER_PLACEMENT: `pack` (default) puts a model where it fits with
the least memory left over, keeping whole GPUs free for big models; `spread` onto the emptiest."""

from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from gpus.models import Gpu, Host
from policy import reservations

from . import admission, estimates, model_files
from .claims import GpuClaims
from .errors import Refused
from .estimates import gib
from .keepalive import expires_at
from .models import GpuInstance, LlamaBinary


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
    room: list[GpuClaims] = field(default_factory=list)  # each GPU's claims before this load

    @property
    def claims(self) -> list[int | None]:
        return admission.new_claims(self.prediction, self.gpus)

    @property
    def fits(self) -> bool:
        if self.prediction.fits is False:
            return False
        return all(r.fits(c) for r, c in zip(self.room, self.claims, strict=False))

    @property
    def spare_mib(self) -> int:
        """The least memory left on one of the GPUs after this load's claim, beside the claims there."""
        if self.room and self.prediction.estimate is not None:
            return min(r.left_after_mib(c) for r, c in zip(self.room, self.claims, strict=False))
        after = [a for a in self.prediction.free_after_mib if a is not None]
        return min(after) if after else 0

    def beside(self) -> str:
        """ "gemma3-270m and tiny" : the models already on the GPUs."""
        named = sorted({h.model_id for r in self.room for h in r.holders})
        return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1] if named else ""

    def explain(self) -> str:
        where = f"GPU {self.prediction.gpu_label()} on {self.host.name}"
        p = self.prediction
        if p.estimate is None:
            return f"{where}: no estimate ({p.error}); {_free_text(self.gpus)}"
        if p.fits is None:
            return f"{where}: ≈ {gib(p.total_mib)}, free memory unknown"
        others = "".join(f"; {n}" for n in self.notes)
        if self.fits and self.beside():
            return (
                f"{where}: fits beside {self.beside()} on GPU {p.gpu_label()}, {gib(self.spare_mib)} left "
                f"(≈ {gib(p.total_mib)}){others}"
            )
        if self.fits:
            return f"{where}: fits with {gib(self.spare_mib)} to spare (≈ {gib(p.total_mib)}){others}"
        if p.fits and self.beside():
            return (
                f"{where}: no room beside {self.beside()} (≈ {gib(p.total_mib)}, {self._room_text()}){others}"
            )
        return f"{where}: does not fit (≈ {gib(p.total_mib)}, {_free_text(self.gpus)}){others}"

    def as_dict(self) -> dict:
        return {
            "host": self.host.name,
            "gpu_ids": self.prediction.gpu_label(),
            "fits": self.fits if self.prediction.fits is not None else None,
            "estimated_mib": self.prediction.total_mib if self.prediction.estimate else None,
            "spare_mib": self.spare_mib if self.prediction.estimate else None,
            "shared_with_others": self.shared,
            "beside": sorted({h.model_id for r in self.room for h in r.holders}),
            "explanation": self.explain(),
            "summary": self.prediction.summary(),
        }

    def _room_text(self) -> str:
        return ", ".join(f"GPU {r.index} {gib(max(0, r.free_mib))} unclaimed" for r in self.room)


def _free_text(gpus: list[Gpu]) -> str:
    return ", ".join(f"GPU {g.index} {gib(_free_mib(g))} free" for g in gpus)


def _used_by_others(gpu: Gpu) -> str | None:
    foreign = [p for p in gpu.processes or [] if p.get("owner") != "instance"]
    if not foreign:
        return None
    total = sum(int(p.get("used_mib") or 0) for p in foreign)
    names = ", ".join(sorted({p.get("name") or "?" for p in foreign})[:3])
    return f"GPU {gpu.index}: {gib(total)} used by {names}"


ANYONE = object()  # no requester given: GPUs reserved for someone are offered too (the form marks them)


def _reserved_for_others(gpus: list[Gpu], requester) -> set[int]:
    """The GPUs (pks) that a reservation keeps `requester` off now (policy/reservations.py): from its notice
    before the start to its end, only its holders load there."""
    blocked = set()
    for host in {g.host_id: g.host for g in gpus}.values():
        indices = {
            i
            for r in reservations.fencing(host)
            if not reservations.is_holder(r, requester)
            for i in (r.gpu_indices or ())
        }
        blocked |= {g.pk for g in gpus if g.host_id == host.pk and g.index in indices}
    return blocked


def candidate_gpus(model, host: Host | None, requester=ANYONE):
    """The GPUs a load of `model` may go to: those of live hosts with a llama-server and the model's file, less
    (with a `requester`: the user who asks, or None) the GPUs a reservation keeps them off."""
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
    if requester is ANYONE:
        return gpus
    blocked = _reserved_for_others(gpus, requester)
    return [g for g in gpus if g.pk not in blocked]


def _held(model, room: GpuClaims) -> str | None:
    """Why the model may not join this GPU's holders whatever the memory (the same model, sharing off, an
    exclusive model), in words; None when it may."""
    conflict = room.conflict(model.pk, exclusive=model.exclusive, sharing=settings.GPU_SHARING)
    if conflict is None:
        return None
    kind, holder = conflict
    why = {"same": "", "sharing_off": "", "exclusive": "; exclusive"}[kind]
    return f"held by {holder.model_id} (instance #{holder.instance_id}, {holder.status}){why}"


def _without_file(model, host: Host | None) -> list[str]:
    """Live hosts left out because their worker reported that it cannot serve the model, with the reason."""
    return [f"host {h.name}: {reason}" for h, reason in model_files.missing_on_live_hosts(model, host)]


def rank(
    model, *, host: Host | None = None, overrides: dict | None = None, requester=ANYONE
) -> tuple[list[Choice], list[str]]:
    """The GPU sets `model` may load on, best first, and why the other GPUs are out. Single GPUs that fit
    come first (idle ones before those shared with other people's processes, then by the memory left after
    the estimate); when no single GPU fits, the smallest set of a host's free GPUs that fits. GPU sets
    predicted not to fit follow, for the explanation. Hosts whose worker reported that it cannot serve the
    model (models_app/model_files.py) are left out, and said so."""
    gpus = candidate_gpus(model, host, requester)
    room = admission.gpu_claims(gpus)
    out = _without_file(model, host)
    usable = []
    for gpu in gpus:
        where = f"GPU {gpu.index} on {gpu.host.name}"
        held = _held(model, room[gpu.pk])
        if held:
            out.append(f"{where}: {held}")
        elif gpu.state == Gpu.State.UNAVAILABLE:
            out.append(f"{where}: unavailable ({gpu.state_reason or 'the GPU query failed'})")
        else:
            usable.append(gpu)
    singles = []
    for gpu in usable:
        choice = Choice(gpu.host, [gpu], estimates.predict(model, [gpu], overrides), room=[room[gpu.pk]])
        other = _used_by_others(gpu)
        if other or gpu.state == Gpu.State.OCCUPIED_BY_OTHERS:
            choice.shared = True
            choice.notes.append(
                other or f"GPU {gpu.index}: {gib(gpu.memory_used_mib or 0)} used by other processes"
            )
        singles.append(choice)

    pack = settings.PLACEMENT == "pack"

    def key(c: Choice):
        if c.prediction.estimate is None:  # size unknown: the emptiest GPU
            return (not c.fits, c.shared, -_free_mib(c.gpus[0]))
        return (not c.fits, c.shared, c.spare_mib if pack else -c.spare_mib)

    singles.sort(key=key)
    if any(c.fits for c in singles):
        return singles, out
    sets = []
    by_host: dict[int, list[Gpu]] = {}
    for gpu in usable:  # sets only of GPUs nobody else uses
        if gpu.state != Gpu.State.OCCUPIED_BY_OTHERS and not room[gpu.pk].holders:
            by_host.setdefault(gpu.host_id, []).append(gpu)
    for host_gpus in by_host.values():
        host_gpus.sort(key=lambda g: -_free_mib(g))
        for size in range(2, min(len(host_gpus), MAX_SET) + 1):
            chosen = sorted(host_gpus[:size], key=lambda g: g.index)
            prediction = estimates.predict(model, chosen, overrides)
            choice = Choice(chosen[0].host, chosen, prediction, room=[room[g.pk] for g in chosen])
            if choice.fits:
                sets.append(choice)
                break
    sets.sort(key=lambda c: (len(c.gpus), -c.spare_mib))
    return sets + singles, out


def choose_gpus(model, *, host: Host | None = None, requester=ANYONE) -> tuple[Host, list[Gpu]]:
    """The first of `rank`: the single GPU where the model's claim fits best (LLAMACONTROLLER_PLACEMENT; idle
    GPUs before those shared with other people's processes), else the smallest set of one host's unused GPUs
    that fits. GPUs that are unavailable, or whose holders it may not join, are skipped; a GPU occupied by
    others is used only when the model is predicted to fit beside them. Raises Refused (busy, field gpu_id) naming the busy GPUs
    and what keeps them busy, with the numbers, a Retry-After (the soonest a GPU frees) and `freeing` when
    one of them is being unloaded."""
    gpus = candidate_gpus(model, host, requester)
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
    choices, _ = rank(model, host=host, requester=requester)
    fitting = [c for c in choices if c.fits]
    if fitting:
        return fitting[0].host, fitting[0].gpus

    by_gpu = {c.gpus[0].pk: c for c in choices if len(c.gpus) == 1}
    room = admission.gpu_claims(gpus)
    held_by = {h.instance_id for r in room.values() for h in r.holders}
    instances = {i.pk: i for i in GpuInstance.objects.filter(pk__in=held_by).select_related("model")}
    busy, soonest, freeing = [], None, False
    for gpu in gpus:
        where = f"GPU {gpu.index} on {gpu.host.name}"
        choice = by_gpu.get(gpu.pk)
        numbers = ""
        if choice is not None and choice.prediction.estimate is not None:
            free = max(0, room[gpu.pk].free_mib) if room[gpu.pk].holders else choice.prediction.free_mib[0]
            numbers = f" (needs ≈ {choice.prediction.total_mib} MiB, {free} MiB free)"
        if room[gpu.pk].holders:
            named = [f"{h.model_id} (instance #{h.instance_id}, {h.status})" for h in room[gpu.pk].holders]
            busy.append(f"{where}: {', '.join(named)}{numbers}")
            for holder in room[gpu.pk].holders:
                instance = instances[holder.instance_id]
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
