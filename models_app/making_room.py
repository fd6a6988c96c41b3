"""Making room: when a load does not fit, which idle models to unload so that it does. models_app/eviction.py
chooses (plain Python); this module reads the instances and their claims (models_app/admission.py), and,
inside the load's transaction, marks the victims stopping with an event that says why. The new instance's
load stops them before it starts (as a switch does), so their memory is free before its process exists.

Only single GPUs are considered for eviction (a model that needs a set of GPUs gets one of unused GPUs, as
placement proposes). Which instances may go (README "Sharing GPUs"): running, loaded on demand or with a
registry keep-alive (not 0), no request in flight for LLAMACONTROLLER_EVICT_MIN_IDLE_SECONDS, loaded for
LLAMACONTROLLER_EVICT_MIN_RESIDENCY_SECONDS."""

from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from accounts.roles import can_manage_instance
from gpus.models import Gpu, Host
from policy import pins, quotas

from . import admission, claims, estimates, eviction, keepalive, placement
from .errors import Refused
from .estimates import gib
from .models import GpuInstance, InstanceEvent, InstanceGpu
from .state import transition

Status = GpuInstance.Status
# InstanceEvent.reason of an eviction: idle, chosen least recently used first; or memory beyond its owner's
# quota (the team policy), reclaimed before any other.
IDLE_LRU = "idle_lru"
BORROWED_RECLAIM = "borrowed_reclaim"
NO_ROOM_RETRY_SECONDS = 60  # Retry-After when nothing on the GPUs says when it could go


@dataclass
class Room:
    """Where a load goes once `victims` (least recently used first) have stopped, and the plan's figures."""

    host: Host
    gpus: list[Gpu]
    victims: list[GpuInstance]
    plan: eviction.Plan
    idle_count: int  # evictable instances on those GPUs (for the sentence)

    @property
    def victim_ids(self) -> list[int]:
        return [v.pk for v in self.victims]

    def freed_mib(self) -> dict[int, int]:
        """Memory each victim's processes use on each GPU (Gpu pk), for the prediction of the new load."""
        return {
            gpu.pk: sum(claims.measured_mib(gpu.processes or [], v.pk) or 0 for v in self.victims)
            for gpu in self.gpus
        }

    def waiting_note(self) -> str:
        """For the load's event: "waiting for room: unloading gemma3-270m (#4) on GPU 0"."""
        named = ", ".join(f"{v.model_id} (#{v.pk})" for v in self.victims)
        return f"waiting for room: unloading {named} on GPU {','.join(str(g.index) for g in self.gpus)}"


def _who(user) -> str:
    return user.get_username() if user is not None else "system"


def _kind_kept(instance: GpuInstance) -> str:
    """Why the kind of instance is never evicted ("" when it may be, once idle)."""
    keep_alive = instance.model.keep_alive_seconds
    if keep_alive == 0:
        return "its model's keep-alive is 0 (never unloaded automatically)"
    if not instance.loaded_on_demand and keep_alive is None:
        return "loaded by hand without a keep-alive"
    return ""


@dataclass(frozen=True)
class Standing:
    """What the team policy says of the active instances: pinned (never evicted) and borrowed (beyond their
    owner's quota: reclaimed first)."""

    pinned: frozenset = frozenset()
    borrowed: frozenset = frozenset()

    @classmethod
    def now(cls) -> "Standing":
        return cls(frozenset(pins.pinned_instance_ids()), frozenset(quotas.borrowed_instance_ids()))


def resident(
    instance: GpuInstance, claims_by_gpu: dict, now: datetime, standing: Standing = Standing()
) -> eviction.Resident:
    """The instance as eviction sees it: its claim on each GPU (Gpu pk) and why it is kept, if it is."""
    claim = {
        gpu_pk: room.claim_of(holder)
        for gpu_pk, room in claims_by_gpu.items()
        for holder in room.holders
        if holder.instance_id == instance.pk
    }
    idle_since = keepalive.idle_since(instance)
    borrowed = instance.pk in standing.borrowed
    pinned = "pinned (never unloaded automatically)" if instance.pk in standing.pinned else ""
    why = (
        pinned
        or _kind_kept(instance)
        or eviction.why_kept(
            status=instance.status,
            evictable_kind=True,
            in_flight=instance.in_flight if keepalive.serving(instance, now) else 0,
            idle_seconds=(now - idle_since).total_seconds(),
            resident_seconds=(now - (instance.loaded_at or now)).total_seconds(),
            min_idle_seconds=settings.EVICT_MIN_IDLE_SECONDS,
            min_residency_seconds=settings.EVICT_MIN_RESIDENCY_SECONDS,
            borrowed=borrowed,
        )
    )
    return eviction.Resident(instance.pk, instance.model_id, claim, idle_since.timestamp(), why, borrowed)


def _shortfall(model, gpu: Gpu, room, claim: int | None) -> int | None:
    """MiB to free on the GPU for the load's claim; None when no eviction makes it fit (the claim exceeds what
    other people's processes leave, the same model is there, or the GPU is unavailable)."""
    if gpu.state == Gpu.State.UNAVAILABLE:
        return None
    if claim is not None and claim > room.total_mib - room.foreign_mib:
        return None
    conflict = room.conflict(model.pk, exclusive=model.exclusive, sharing=settings.GPU_SHARING)
    if conflict is not None and conflict[0] == "same":
        return None
    if conflict is not None or claim is None or any(h.whole_gpu for h in room.holders):
        return room.claimed_mib  # every holder must go
    return claim - room.free_mib


def _survey(model, gpus: list[Gpu], now: datetime, standing: Standing):
    """The candidates (each GPU with its shortfall), the residents on them and their rows."""
    claims_by_gpu = admission.gpu_claims(gpus)
    ids = {h.instance_id for room in claims_by_gpu.values() for h in room.holders}
    rows = {i.pk: i for i in GpuInstance.objects.filter(pk__in=ids).select_related("model", "owner")}
    residents = [resident(rows[pk], claims_by_gpu, now, standing) for pk in sorted(rows)]
    candidates = []
    for gpu in gpus:
        room = claims_by_gpu[gpu.pk]
        if not room.total_mib:  # memory not reported yet
            continue
        prediction = estimates.predict(model, [gpu])
        shortfall = _shortfall(model, gpu, room, admission.new_claims(prediction, [gpu])[0])
        if shortfall is not None:
            candidates.append(((gpu.pk,), {gpu.pk: shortfall}))
    return candidates, residents, rows


def find(
    model, *, host: Host | None = None, gpus: list[Gpu] | None = None, now=None, requester=placement.ANYONE
) -> Room | None:
    """The victims whose unloading lets `model` load (on `gpus`, or anywhere placement would look), or None
    when no set of idle models makes room."""
    now = now or timezone.now()
    gpus = gpus if gpus is not None else placement.candidate_gpus(model, host, requester)
    if not gpus:
        return None
    candidates, residents, rows = _survey(model, gpus, now, Standing.now())
    plan = eviction.choose_victims(candidates, residents)
    if plan is None or not plan.victims:
        return None
    by_pk = {g.pk: g for g in gpus}
    chosen = [by_pk[pk] for pk in plan.gpus]
    idle = sum(1 for r in residents if r.evictable and set(plan.gpus) & set(r.claim_mib))
    return Room(chosen[0].host, chosen, [rows[v.instance_id] for v in plan.victims], plan, idle)


def _eligible_at(instance: GpuInstance, now: datetime) -> datetime | None:
    """When the instance frees its GPU memory or may be evicted, if anything says when."""
    if instance.status == Status.STOPPING:
        return now + timedelta(seconds=settings.STOP_TIMEOUT)
    times = [keepalive.expires_at(instance, now)]
    if not _kind_kept(instance) and not keepalive.serving(instance, now):
        loaded = instance.loaded_at or now  # a load under way: its residency counts from now at the soonest
        times.append(
            max(
                keepalive.idle_since(instance) + timedelta(seconds=settings.EVICT_MIN_IDLE_SECONDS),
                loaded + timedelta(seconds=settings.EVICT_MIN_RESIDENCY_SECONDS),
            )
        )
    known = [t for t in times if t is not None]
    return min(known) if known else None


def no_room(
    model, refusal: Refused, *, host: Host | None = None, now=None, requester=placement.ANYONE
) -> Refused:
    """The capacity refusal once eviction cannot help either: the placement's reasons, why each model there
    stays, and a Retry-After from what the controller knows (a stop under way, the soonest an idle model may
    be evicted or unloads for idleness), never a load's keep-alive."""
    now = now or timezone.now()
    gpus = placement.candidate_gpus(model, host, requester)
    standing = Standing.now()
    candidates, residents, rows = _survey(model, gpus, now, standing) if gpus else ([], [], {})
    _refuse_for_pins(model, candidates, residents, gpus, standing)
    kept = eviction.kept_reasons([g.pk for g in gpus], residents)
    soonest = [t for t in (_eligible_at(row, now) for row in rows.values()) if t is not None]
    retry_after = refusal.retry_after or NO_ROOM_RETRY_SECONDS
    if soonest:
        retry_after = max(1, min(3600, int((min(soonest) - now).total_seconds()) + 1))
    message = refusal.message
    if kept:
        message += "; nothing may be evicted to make room: " + "; ".join(kept)
    usable = [g for g in gpus if g.state != Gpu.State.UNAVAILABLE]
    return Refused(
        message,
        code=refusal.code,
        field=refusal.field,
        retry_after=retry_after,
        freeing=refusal.freeing,
        reason="no_evictable_model" if usable else "gpu_unavailable",
    )


def _refuse_for_pins(model, candidates, residents, gpus, standing: Standing) -> None:
    """pinned_no_room (the policy's refusal) when unloading pinned models, and only that, would make room:
    pins are never broken, and the asker is told which pin stands in the way."""
    if not standing.pinned:
        return
    unpinned = [
        replace(r, why_kept="") if r.instance_id in standing.pinned and r.why_kept.startswith("pinned") else r
        for r in residents
    ]
    plan = eviction.choose_victims(candidates, unpinned)
    if plan is None:
        return
    blocking = [v.instance_id for v in plan.victims if v.instance_id in standing.pinned]
    if blocking:
        by_pk = {g.pk: g for g in gpus}
        where = ", ".join(f"GPU {by_pk[pk].index} of {by_pk[pk].host.name}" for pk in plan.gpus)
        raise pins.no_room(model.pk, where, blocking)


def sentence(victim: GpuInstance, room: Room, *, model_id: str, actor, now: datetime) -> str:
    """ "gemma3-270m (#4, loaded on demand by alice) was unloaded for bob's request for llama-8b on GPU 0 of vm:
    idle 14 min, the least recently used of 3 idle models there; its 4.1 GiB claim freed"."""
    how = "loaded on demand" if victim.loaded_on_demand else "loaded"
    whose = f"{actor.get_username()}'s request" if keepalive.authenticated(actor) else "a request"
    idle = keepalive.describe_idle((now - keepalive.idle_since(victim)).total_seconds())
    resident = room.plan.victims[room.victim_ids.index(victim.pk)]
    first = room.plan.victims[0].instance_id == victim.pk
    if resident.borrowed:
        rank = f"beyond {_who(victim.owner)}'s quota (borrowed), reclaimed first"
    elif not first:
        rank = "unloaded with it"
    elif room.idle_count == 1:
        rank = "the only idle model there"
    else:
        rank = f"the least recently used of {room.idle_count} idle models there"
    freed = sum(resident.claim_mib.values())
    where = f"GPU {','.join(str(g.index) for g in room.gpus)} of {room.host.name}"
    return (
        f"{victim.model_id} (#{victim.pk}, {how} by {_who(victim.owner)}) was unloaded for {whose} for "
        f"{model_id} on {where}: idle {idle}, {rank}; its {gib(freed)} claim freed"
    )


def check_may_evict(room: Room, actor) -> None:
    """A load by hand that asks to evict: its actor must be allowed to unload every victim (403 otherwise)."""
    for victim in room.victims:
        if actor is not None and not can_manage_instance(actor, victim):
            raise Refused(
                f"{actor.get_username()} may not unload instance #{victim.pk} ({victim.model_id}) to make room",
                code="forbidden",
            )


def evict(room: Room, *, model_id: str, actor) -> None:
    """Inside the load's transaction: lock the victims, check each is still idle, and mark it stopping with
    its event (kind evicted, reason idle_lru); their GPU links pass to the new load. Refused (busy) when one
    was used meanwhile: the caller looks again."""
    now = timezone.now()
    locked = {
        i.pk: i
        for i in GpuInstance.objects.select_for_update(of=("self",))
        .filter(pk__in=room.victim_ids)
        .select_related("model", "owner", "host")
        .order_by("pk")
    }
    claims_by_gpu = admission.gpu_claims(room.gpus)
    standing = Standing.now()
    for victim_id in room.victim_ids:
        row = locked.get(victim_id)
        why = "it is gone" if row is None else resident(row, claims_by_gpu, now, standing).why_kept
        if why:
            raise Refused(f"making room for {model_id} failed: instance #{victim_id} {why}", code="busy")
    for victim_id in room.victim_ids:
        row = locked[victim_id]
        if not transition(
            row,
            Status.STOPPING,
            expected=[Status.RUNNING],
            event_kind=InstanceEvent.Kind.EVICTED,
            reason=BORROWED_RECLAIM if row.pk in standing.borrowed else IDLE_LRU,
            detail=sentence(row, room, model_id=model_id, actor=actor, now=now),
            lease_expires_at=None,
        ):
            raise Refused(f"making room for {model_id} failed: instance #{victim_id} changed", code="busy")
        InstanceGpu.objects.filter(instance=row, active=True).update(active=False)
