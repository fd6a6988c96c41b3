"""Admission by memory: whether a load may start on a set of GPUs beside what already holds them. The claim
arithmetic is models_app/claims.py (plain Python); this module reads the claims from the database and, inside
the load's transaction, decides with the GPU rows locked.

The guarantee that admitted claims never exceed a GPU's memory rests here: `admit` locks the GPU rows in a
fixed order (primary key) with SELECT ... FOR UPDATE on PostgreSQL, so two loads onto one GPU take turns and
the second sees the first's claim; on SQLite every write transaction is IMMEDIATE (settings), which
serialises the same code. Every entry point (REST, the seed-compatible API, web form, admin, CLI, the gateway's
load on demand) loads through models_app.services, which calls `admit`."""

from collections import defaultdict
from dataclasses import replace

from django.conf import settings

from gpus.models import Gpu
from utilities.dbutil import read, select

from . import claims
from .errors import Refused
from .estimates import gib
from .models import GpuInstance, InstanceGpu, ModelConfig


def estimate_on(memory_estimate: dict | None, memory_estimated_mb: int | None, gpu_ids: str, position: int):
    """An instance's estimate (corrected, as stored at load time: its columns of these names) on its GPU at
    `position`; None without an estimate."""
    per_gpu = (memory_estimate or {}).get("per_gpu") or []
    if position < len(per_gpu) and per_gpu[position].get("estimated_mib") is not None:
        return int(per_gpu[position]["estimated_mib"])
    if memory_estimated_mb is not None:  # a row stored before the per-GPU figures
        return -(-memory_estimated_mb // max(1, len(gpu_ids.split(","))))
    return None


def _holder_rows(gpus: list[Gpu]) -> list[tuple]:
    """(gpu_id, position, instance_id, model_id, status, memory_estimate, memory_estimated_mb, gpu_ids,
    exclusive) of each active link on `gpus`, by instance: the columns a claim needs, not whole rows. One
    plain statement (utilities.dbutil.read): a load reads these on its way (issue 22); the ORM took ~0.8 ms
    to build it, met cold."""
    if not gpus:
        return []
    return read(
        "SELECT {l.gpu}, {l.position}, {l.instance}, {i.model}, {i.status}, {i.memory_estimate}, "
        "{i.memory_estimated_mb}, {i.gpu_ids}, {m.exclusive} FROM {l} "
        "INNER JOIN {i} ON {i.id} = {l.instance} INNER JOIN {m} ON {m.id} = {i.model} "
        "WHERE {l.gpu} IN ({many}) AND {l.active} = %s ORDER BY {l.instance}, {l.position}",
        {"l": InstanceGpu, "i": GpuInstance, "m": ModelConfig},
        [*(g.pk for g in gpus), True],
        many=len(gpus),
    )


def gpu_claims(gpus: list[Gpu]) -> dict[int, claims.GpuClaims]:
    """Each GPU's claims (by Gpu pk), from the rows as given (lock and refresh them first to decide). A GPU
    whose used memory is not reported yet (or of unknown size) has `memory_known` False: only the rules
    about who may share it apply (as a prediction without figures never refused a load)."""
    by_pk = {gpu.pk: gpu for gpu in gpus}
    holders = defaultdict(list)
    for (
        gpu_id,
        position,
        instance_id,
        model_id,
        status,
        estimate,
        estimated_mb,
        gpu_ids,
        exclusive,
    ) in _holder_rows(gpus):
        holders[gpu_id].append(
            claims.Holder(
                instance_id=instance_id,
                model_id=model_id,
                status=status,
                estimate_mib=estimate_on(estimate, estimated_mb, gpu_ids, position),
                measured_mib=claims.measured_mib(by_pk[gpu_id].processes or [], instance_id),
                exclusive=exclusive,
            )
        )
    return {
        gpu.pk: claims.GpuClaims(
            gpu_id=gpu.pk,
            index=gpu.index,
            total_mib=gpu.memory_total_mib or 0,
            foreign_mib=claims.foreign_mib(gpu.memory_used_mib, gpu.processes or []),
            holders=tuple(holders[gpu.pk]),
            headroom_mib=settings.GPU_HEADROOM_MIB,
            memory_known=bool(gpu.memory_total_mib) and gpu.memory_used_mib is not None,
        )
        for gpu in gpus
    }


def new_claims(prediction, gpus: list[Gpu]) -> list[int | None]:
    """The claim a load would hold on each of `gpus` (its estimate there plus the headroom; None, the whole
    GPU, without an estimate)."""
    if prediction is None or prediction.estimate is None:
        return [None] * len(gpus)
    return [claims.new_claim_mib(mib, settings.GPU_HEADROOM_MIB) for mib in prediction.per_gpu_mib]


def names(gpu: claims.GpuClaims) -> str:
    """ "gemma3-270m (#4) and tiny (#6)"."""
    named = [f"{h.model_id} (#{h.instance_id})" for h in gpu.holders]
    return named[0] if len(named) == 1 else ", ".join(named[:-1]) + " and " + named[-1] if named else ""


def conflict_refusal(kind: str, holder: claims.Holder, where: str, model_id: str) -> Refused:
    """The 409 for a load that may not join a GPU's holders whatever the memory."""
    held = f"instance #{holder.instance_id} ({holder.model_id}, {holder.status})"
    if kind == "same":
        message = f"{model_id} already runs on {where} ({held}); a second copy on the same GPUs needs force"
    elif kind == "sharing_off":
        message = f"GPU busy: {where} is held by {held}; unload or switch it first"
    elif holder.model_id == model_id or holder.exclusive:
        message = f"{where} is held by {held}, which wants its GPUs to itself (exclusive)"
    else:
        message = f"{model_id} is exclusive: it wants its GPUs to itself, and {where} holds {held}"
    return Refused(message, field="gpu_id", code="busy")


def lock_gpu_rows(gpus: list[Gpu]) -> dict[int, Gpu]:
    """Lock the GPU rows in pk order, by pk. Every transaction that writes GPU rows and instance rows takes
    the GPU rows first (admission, a switch, the telemetry refreshes): the opposite order deadlocked a
    switch against the worker's live refresh on PostgreSQL."""
    return {g.pk: g for g in select(Gpu, {"pk__in": [g.pk for g in gpus]}, order_by=("pk",), for_update=True)}


def admit(model, gpus: list[Gpu], prediction, *, force: bool, freed_mib: dict[int, int] | None = None) -> str:
    """Inside the load's transaction: lock the GPU rows (fixed order), then refuse (409) a load that may not
    join the GPUs' holders (the same model already there unless forced; sharing off; exclusive models) or
    whose claim does not fit beside the claims and foreign memory on a GPU, unless forced. `freed_mib`:
    memory per GPU pk that the load frees first (a switch: the replaced instances'). Returns what a forced
    load goes over, for its event ("" when nothing)."""
    locked = lock_gpu_rows(gpus)
    fresh = [locked[g.pk] for g in gpus]
    for gpu, given in zip(fresh, gpus, strict=True):
        gpu.host = given.host  # its name for the messages (a GPU never changes host), not read again
    state = gpu_claims(fresh)
    wanted = new_claims(prediction, fresh)
    forced = []
    for gpu, claim in zip(fresh, wanted, strict=True):
        where = f"GPU {gpu.index} on {gpu.host.name}"
        here = state[gpu.pk]
        if freed_mib and freed_mib.get(gpu.pk):
            here = replace(here, foreign_mib=max(0, here.foreign_mib - freed_mib[gpu.pk]))
        conflict = here.conflict(model.pk, exclusive=model.exclusive, sharing=settings.GPU_SHARING)
        if conflict is not None and not (force and conflict[0] == "same"):
            raise conflict_refusal(*conflict, where, model.pk)
        if conflict is not None:
            forced.append(f"a second copy of {model.pk} on {where}")
        if here.fits(claim):
            continue
        need = "the whole GPU (no estimate)" if claim is None else f"{claim} MiB"
        message = (
            f"{model.pk} does not fit on {where}: it claims {need}; {here.claimed_mib} MiB are claimed by "
            f"{names(here) or 'nothing'} and {here.foreign_mib} MiB used by other processes, of "
            f"{here.total_mib} MiB ({gib(max(0, here.free_mib))} left)"
        )
        if not force:
            raise Refused(f"{message}; load with force to try anyway", field="gpu_id", code="busy")
        forced.append(message)
    return "; ".join(forced)


def report(gpus: list[Gpu]) -> list[dict]:
    """Each GPU's memory as admission sees it, for the API: total, foreign, claimed and free MiB, and each
    instance holding it with its claim, its estimate and its own measured memory there."""
    state = gpu_claims(gpus)
    rows = []
    for gpu in gpus:
        here = state[gpu.pk]
        rows.append(
            {
                "gpu": gpu.pk,
                "host": gpu.host.name,
                "index": gpu.index,
                "total_mib": gpu.memory_total_mib,
                "memory_known": here.memory_known,
                "foreign_mib": here.foreign_mib,
                "claimed_mib": here.claimed_mib,
                "free_mib": here.free_mib if here.memory_known else None,
                "instances": [
                    {
                        "instance_id": h.instance_id,
                        "model_id": h.model_id,
                        "status": h.status,
                        "claimed_mib": here.claim_of(h),
                        "estimated_mib": h.estimate_mib,
                        "measured_mib": h.measured_mib,
                        "exclusive": h.exclusive,
                    }
                    for h in here.holders
                ],
            }
        )
    return rows
