"""What web, API, admin and CLI call to load, unload and switch models. Requests are validated and
recorded here, then the work goes to the worker of the GPUs' host; nothing here starts a process.

`actor` is a user (its role is checked) or None for the system (CLI, beat)."""

from django.db import IntegrityError, transaction

from accounts.roles import can_administer, can_load, can_manage_instance
from gpus import services as gpu_services
from gpus.models import Gpu
from policy import admission as policy_admission
from policy import reservations
from policy.reasons import PolicyRefusal, mib
from policy.rules import BORROWED
from utilities.dbutil import create

from . import admission, dispatch, making_room, placement
from .checks import (
    actor_id,
    busy,
    check_actor,
    check_broker,
    check_fit,
    check_gpu_state,
    check_host_up,
    check_model_on_host,
    estimate_fields,
    holders,
    host_named,
    model_to_load,
    parse_gpu_spec,
    predict_load,
    resolve_gpus,
)
from .errors import Refused
from .events import record
from .models import GpuInstance, InstanceEvent, InstanceGpu
from .state import transition

Status = GpuInstance.Status
Kind = InstanceEvent.Kind


# --- load ----------------------------------------------------------------------------------------------


def _create_pending(
    model,
    host,
    gpus,
    actor,
    *,
    event_kind: str,
    detail: str,
    on_demand: bool = False,
    prediction=None,
    waiting_for: str = "",
) -> GpuInstance:
    """Insert the instance and its GPU links (admitted by the caller, models_app.admission); a partial unique
    index refuses a second load on demand of one model. Called inside the caller's transaction, which _Busy
    leaves (rolled back): no savepoints of its own."""
    owner = actor if actor_id(actor) else None
    instance = GpuInstance(
        model=model,
        host=host,
        gpu_ids=",".join(str(g.index) for g in gpus),
        owner=owner,
        loaded_on_demand=on_demand,
        waiting_for=waiting_for,
        **estimate_fields(prediction),
    )
    # Plain INSERTs (utilities.dbutil.create; neither model has signal receivers): on every load's way.
    try:
        with transaction.atomic(savepoint=False):
            create(instance)
            for n, gpu in enumerate(gpus):
                create(InstanceGpu(instance=instance, gpu=gpu, position=n))
    except IntegrityError:
        raise _Busy() from None
    record(event_kind, instance=instance, actor=actor, detail=detail)
    dispatch.send_load(instance, at_once=False)
    return instance


class _Busy(Exception):
    pass


def request_load(
    *,
    model_id: str,
    gpu_spec: str,
    actor,
    host_name: str | None = None,
    force: bool = False,
    on_demand: bool = False,
    note: str = "",
    evict: bool = False,
    room: making_room.Room | None = None,
) -> GpuInstance:
    """Validate, admit by memory (models_app.admission: beside the claims already on the GPUs), create a
    pending instance holding the GPUs with its memory estimate, and (on commit) queue its load. A load that
    does not fit is refused with the numbers (409), as is the same model twice on one GPU. `force`: load
    anyway, onto GPUs that other processes occupy, where it is predicted not to fit, over the claims, or as a
    second copy (recorded in the event). `on_demand`: a load the gateway asked
    for (models_app.ondemand, which has checked who may wake the model); idle unload applies to it, and
    only one such load of a model is under way at a time. `note` is added to the event. `evict`: where the
    load does not fit, unload idle models to make room (models_app/room.py; the actor must be allowed to
    unload each); `room`: victims already chosen (the gateway's load on demand)."""
    if not on_demand:
        check_actor(can_load(actor), actor, "load models")
    model = model_to_load(model_id)
    host, gpus = resolve_gpus(parse_gpu_spec(gpu_spec), host_name)
    check_host_up(host)
    check_model_on_host(model, host)
    if evict and room is None:
        room = making_room.find(model, gpus=gpus)
        if room is not None:
            making_room.check_may_evict(room, actor)
    prediction = predict_load(model, gpus, freed_mib=room.freed_mib() if room else None)
    forced = check_gpu_state(gpus, force=force, prediction=prediction)
    over_fit = check_fit(prediction, force=force)
    check_broker()
    detail = f"load {model.pk} on {host.name} GPU {','.join(str(g.index) for g in gpus)}"
    if room is not None:
        note = "; ".join(n for n in (note, room.waiting_note()) if n)
    if forced:
        detail += f" (forced over other processes: {forced})"
    if over_fit:
        detail += f" (forced: {over_fit})"
    if on_demand:
        detail += " on demand"
    if note:
        detail += f" ({note})"
    try:
        with transaction.atomic():
            if room is not None:
                making_room.evict(room, model_id=model.pk, actor=actor)
            over_claims = admission.admit(model, gpus, prediction, force=force)
            if over_claims:
                detail += f" (forced: {over_claims})"
            if check_policy(actor, model, host, gpus, prediction, needs_room=room is not None) == BORROWED:
                detail += " (borrowed: beyond the quota, on free memory; reclaimed first when room is needed)"
            return _create_pending(
                model,
                host,
                gpus,
                actor,
                event_kind=Kind.REQUESTED,
                detail=detail,
                on_demand=on_demand,
                prediction=prediction,
                waiting_for=room.waiting_note() if room is not None else "",
            )
    except _Busy:
        raise busy(gpus) from None


def check_policy(actor, model, host, gpus: list[Gpu], prediction, *, needs_room: bool) -> str:
    """The team policy's say (policy.admission: reservations 409, quotas 429), inside the admission transaction
    with the GPUs locked: the load's standing, "guaranteed" or "borrowed". A quota counts a model's memory as
    the policy counts the ones held (its estimate, or measured once larger: no headroom); a model without an
    estimate counts as its whole GPUs. Memory reservations count admission's claim (with the headroom)."""
    claims = admission.new_claims(prediction, gpus)
    whole = [g.memory_total_mib or 0 for g in gpus]
    claim_mib = sum(c if c is not None else w for c, w in zip(claims, whole, strict=True))
    model_mib = prediction.total_mib if prediction is not None and prediction.estimate else sum(whole)
    user = actor if actor_id(actor) else None
    fenced = reservations.fencing(host)  # read once, for the memory reservations and the GPUs' alike
    check_memory_reservations(user, model, host, claim_mib, fenced=fenced)
    return policy_admission.check_load(
        user,
        host=host,
        gpus=gpus,
        model_id=model.pk,
        claim_mib=model_mib,
        needs_room=needs_room,
        fenced=fenced,
    )


def check_memory_reservations(user, model, host, claim_mib: int, *, fenced=None) -> None:
    """A reservation of an amount of memory on the host (not of GPUs) keeps that much from everyone but its
    holders: the host's claims + foreign memory + this load's claim + the held-back MiB must fit its GPUs'
    memory, else the policy's `reservation` refusal (409) with the numbers. `fenced`: the host's fencing
    reservations, when read already."""
    held = reservations.held_back_mib(user, host, fenced=fenced)
    if not held:
        return
    usable = Gpu.objects.filter(host=host, index__isnull=False).exclude(state=Gpu.State.UNAVAILABLE)
    rooms = admission.gpu_claims(list(usable)).values()
    total = sum(r.total_mib for r in rooms)
    used = sum(r.claimed_mib + r.foreign_mib for r in rooms)
    if used + claim_mib + held > total:
        left = max(0, total - used - held)
        raise PolicyRefusal(
            "reservation",
            f"{mib(held)} of {host.name}'s GPU memory is reserved for others now; {model.pk} needs "
            f"≈ {mib(claim_mib)} and {mib(left)} are left outside the reservation",
        )


AUTO = "auto"  # what the CLI's --gpu (and the API's gpu_id) may say instead of GPU indices


def request_load_auto(
    *, model_id: str, actor, host_name: str | None = None, force: bool = False, evict: bool = False
) -> GpuInstance:
    """A load without GPUs: the controller picks the host (or, with `host_name`, that host's GPUs) with
    placement.choose_gpus, as the load form's suggestion and the gateway's load on demand do, then loads as
    request_load does. Nothing fits: 409 with what keeps each GPU busy; with `evict`, first the idle models
    whose unloading makes room (models_app/making_room.py), where the actor may unload them."""
    check_actor(can_load(actor), actor, "load models")
    model = model_to_load(model_id)
    host = None
    if host_name:
        host = host_named(host_name)
        check_host_up(host)
        check_model_on_host(model, host)
    room, requester = None, actor if actor_id(actor) else None
    try:
        host, gpus = placement.choose_gpus(model, host=host, requester=requester)
    except Refused as refusal:
        room = making_room.find(model, host=host, requester=requester) if evict else None
        if room is None:
            raise (
                making_room.no_room(model, refusal, host=host, requester=requester) if evict else refusal
            ) from None
        making_room.check_may_evict(room, actor)
        host, gpus = room.host, room.gpus
    return request_load(
        model_id=model.pk,
        gpu_spec=",".join(str(g.index) for g in gpus),
        actor=actor,
        host_name=host.name,
        force=force,
        note="GPUs chosen by the controller",
        room=room,
    )


# --- unload --------------------------------------------------------------------------------------------


def request_unload(
    *, instance: GpuInstance, actor, detail: str = "", event_kind: str = Kind.UNLOAD_REQUESTED
) -> GpuInstance:
    """Mark the instance stopping and queue the stop. Asking again while it stops is not an error.
    `detail`: why, for the event (e.g. "idle for 30 min"); `event_kind`: IDLE_UNLOAD for the idle timer."""
    check_actor(can_manage_instance(actor, instance), actor, f"unload instance #{instance.pk}")
    GpuInstance.objects.refresh(instance, "host")
    if instance.status == Status.STOPPING:
        return instance
    if not instance.is_active:
        raise Refused(f"instance #{instance.pk} is not loaded (it is {instance.status})")
    check_host_up(instance.host, f"unload instance #{instance.pk}")
    check_broker()
    # The transition is its own transaction (no savepoint in another one: two statements fewer); the
    # unload is sent when it commits, or when the caller's transaction does.
    if not transition(
        instance,
        Status.STOPPING,
        expected=[Status.PENDING, Status.STARTING, Status.RUNNING],
        event_kind=event_kind,
        actor=actor,
        detail=detail,
        lease_expires_at=None,
    ):
        instance.refresh_from_db()
        if instance.status == Status.STOPPING:
            return instance
        raise Refused(f"instance #{instance.pk} is not loaded (it is {instance.status})")
    dispatch.send_unload(instance, actor_id(actor), at_once=False)
    return instance


def _active_on(gpus: list[Gpu]) -> list[GpuInstance]:
    ids = {link.instance_id for link in holders(gpus)}
    return list(GpuInstance.objects.filter(pk__in=ids).select_related("model", "host").order_by("pk"))


def request_unload_gpus(*, gpu_spec: str, actor, host_name: str | None = None) -> list[GpuInstance]:
    """Unload whatever runs on these GPUs. The actor must be allowed to manage every one of them."""
    host, gpus = resolve_gpus(parse_gpu_spec(gpu_spec), host_name)
    instances = _active_on(gpus)
    if not instances:
        raise Refused(f"nothing is loaded on {host.name} GPU {gpu_spec}", field="gpu_id", code="not_found")
    for instance in instances:
        check_actor(can_manage_instance(actor, instance), actor, f"unload instance #{instance.pk}")
    return [request_unload(instance=instance, actor=actor) for instance in instances]


# --- switch --------------------------------------------------------------------------------------------


def request_switch(
    *, model_id: str, gpu_spec: str, actor, host_name: str | None = None, force: bool = False
) -> GpuInstance:
    """Unload what runs on these GPUs and load `model_id` there, as one request. The GPUs pass to the new
    instance at once (so nobody else takes them in between); its load stops the old processes first."""
    check_actor(can_load(actor), actor, "load models")
    model = model_to_load(model_id)
    host, gpus = resolve_gpus(parse_gpu_spec(gpu_spec), host_name)
    check_host_up(host, "switch")
    check_model_on_host(model, host)
    old = _active_on(gpus)
    for instance in old:
        check_actor(can_manage_instance(actor, instance), actor, f"unload instance #{instance.pk}")
    freed: dict[int, int] = {}
    for instance in old:  # the old instances' memory is given back before the new one loads
        held = [g for g in gpus if instance.gpu_ids and str(g.index) in instance.gpu_ids.split(",")]
        for gpu in held:
            freed[gpu.pk] = freed.get(gpu.pk, 0) + (instance.memory_used_mb or 0) // max(1, len(held))
    prediction = predict_load(model, gpus, freed_mib=freed)
    forced = check_gpu_state(gpus, force=force, prediction=prediction)
    over_fit = check_fit(prediction, force=force)
    check_broker()
    spec = ",".join(str(g.index) for g in gpus)
    replaced = ", ".join(f"#{i.pk} ({i.model_id})" for i in old) or "nothing"
    if forced:
        replaced += f" (forced over other processes: {forced})"
    if over_fit:
        replaced += f" (forced: {over_fit})"
    try:
        with transaction.atomic():
            admission.lock_gpu_rows(gpus)  # before the old instances' rows: the refreshes lock in this order
            for instance in old:
                if instance.status != Status.STOPPING and not transition(
                    instance,
                    Status.STOPPING,
                    expected=[Status.PENDING, Status.STARTING, Status.RUNNING],
                    event_kind=Kind.SWITCH_REQUESTED,
                    actor=actor,
                    detail=f"switching {host.name} GPU {spec} to {model.pk}",
                    lease_expires_at=None,
                ):
                    raise _Busy()
                InstanceGpu.objects.filter(instance=instance, active=True).update(active=False)
            over_claims = admission.admit(model, gpus, prediction, force=force, freed_mib=freed)
            if over_claims:
                replaced += f" (forced: {over_claims})"
            if check_policy(actor, model, host, gpus, prediction, needs_room=False) == BORROWED:
                replaced += " (borrowed: beyond the quota)"
            return _create_pending(
                model, host, gpus, actor, event_kind=Kind.SWITCH_REQUESTED,
                detail=f"switch {host.name} GPU {spec} to {model.pk}, replacing {replaced}",
                prediction=prediction,
            )  # fmt: skip
    except _Busy:
        raise busy(gpus) from None


# --- orphans -------------------------------------------------------------------------------------------


def kill_orphan(*, gpu: Gpu, pid: int, actor) -> None:
    """Ask the GPU's host's worker to kill an orphan llama-server: one that the GPU's latest telemetry lists
    as an orphan (running one of the host's llama-server binaries, owned by no active instance). Refused
    (404 not listed, 409 listed as something else) otherwise; the worker checks all of it again, with the
    process's create time, right before the kill."""
    check_actor(can_administer(actor), actor, "kill processes")
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        raise Refused(f"pid {pid!r} is not a number", field="pid") from None
    if pid <= 1:
        raise Refused(f"pid {pid} is not a process that can be killed", field="pid")
    refusal = gpu_services.why_not_orphan(gpu, pid)
    if refusal is not None:
        code, reason = refusal
        raise Refused(reason, field="pid", code=code)
    host = gpu.host
    check_broker()
    try:
        dispatch.send_kill_orphan(host, pid, actor_id(actor), gpu.pk, at_once=True)
    except Exception as exc:  # the broker went away since the ping
        raise Refused(f"the task queue (Redis) is unreachable: {exc}", code="unavailable") from None
