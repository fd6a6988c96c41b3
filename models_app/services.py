"""What web, API, admin and CLI call to load, unload and switch models. Requests are validated and
recorded here, then the work goes to the worker of the GPUs' host; nothing here starts a process.

`actor` is a user (its role is checked) or None for the system (CLI, beat)."""

import logging
import re
from collections import defaultdict

from django.conf import settings
from django.db import IntegrityError, transaction

from accounts.roles import can_administer, can_load, can_manage_instance
from gpus import services as gpu_services
from gpus.models import Gpu, Host
from models_app import health

from . import dispatch, model_files
from .events import record
from .models import GpuInstance, InstanceEvent, InstanceGpu, ModelConfig
from .registry import RegistryError, check_model_path, check_model_path_form
from .state import transition

logger = logging.getLogger(__name__)

Status = GpuInstance.Status
Kind = InstanceEvent.Kind
MAX_GPUS_PER_INSTANCE = 64
MAX_GPU_INDEX = 1023  # larger ids are refused before they reach the database (30 digits overflowed it)


class LoadRefused(Exception):
    """A request that is not carried out. `code`: "invalid" (HTTP 400), "busy" (409), "forbidden" (403),
    "not_found" (404), "unavailable" (503: the task queue is unreachable). `field` names the bad input."""

    def __init__(self, message: str, *, field: str | None = None, code: str = "invalid"):
        super().__init__(message)
        self.message = message
        self.field = field
        self.code = code


# --- validation --------------------------------------------------------------------------------------

_GPU_ID = re.compile(r"[0-9]+")


def parse_gpu_spec(spec) -> list[int]:
    """ "0,1" -> [0, 1]. Refuses empty, negative, non-numeric and repeated ids."""
    text = "" if spec is None else str(spec).strip()
    if not text:
        raise LoadRefused("no GPU given: use an index such as 0, or 0,1", field="gpu_id")
    ids: list[int] = []
    for raw in text.split(","):
        token = raw.strip()
        if not token:
            raise LoadRefused(f"GPU list {text!r} has an empty entry", field="gpu_id")
        if not _GPU_ID.fullmatch(token):
            what = "negative" if re.fullmatch(r"-[0-9]+", token) else "not a number"
            raise LoadRefused(f"GPU id {token!r} is {what}: use indices such as 0 or 0,1", field="gpu_id")
        if len(token.lstrip("0")) > len(str(MAX_GPU_INDEX)) or int(token) > MAX_GPU_INDEX:
            raise LoadRefused(
                f"GPU id {token!r} is too large: GPU indices go up to {MAX_GPU_INDEX}", field="gpu_id"
            )
        value = int(token)
        if value in ids:
            raise LoadRefused(f"GPU {value} is listed twice in {text!r}", field="gpu_id")
        ids.append(value)
    if len(ids) > MAX_GPUS_PER_INSTANCE:
        raise LoadRefused(f"at most {MAX_GPUS_PER_INSTANCE} GPUs per instance", field="gpu_id")
    return ids


def _check_actor(allowed: bool, actor, what: str) -> None:
    if actor is not None and not allowed:
        raise LoadRefused(f"{actor.get_username()} may not {what}", code="forbidden")


def _model(model_id: str) -> ModelConfig:
    model = ModelConfig.objects.filter(pk=str(model_id or "")).select_related("binary").first()
    if model is None:
        raise LoadRefused(f"unknown model {model_id!r}", field="model_id")
    try:
        if model_files.reported(model):
            # The hosts' workers report the file (checked per host in check_model_on_host); the web node
            # need not have it, so only the path's form is checked here.
            check_model_path_form(model.path)
        else:  # nothing reported yet (a single machine, or no worker has started): check it here
            check_model_path(model.path)
    except RegistryError as exc:
        raise LoadRefused(f"model {model.pk}: {exc}", field="model_id") from None
    return model


def check_model_on_host(model: ModelConfig, host: Host) -> None:
    """Refuse up front (409) a load on a host whose worker reported that it cannot serve the model, with its
    reason. No report yet: accepted (the worker checks the file again when it loads)."""
    reason = model_files.refusal(model, host)
    if reason:
        raise LoadRefused(reason, field="model_id", code="busy")


def host_named(host_name: str, code: str = "invalid") -> Host:
    """The host of that name, or LoadRefused ("unknown host", field host)."""
    host = Host.objects.filter(name=host_name).first()
    if host is None:
        raise LoadRefused(f"unknown host {host_name!r}", field="host", code=code)
    return host


def resolve_gpus(indices: list[int], host_name: str | None) -> tuple[Host, list[Gpu]]:
    """The host and its GPUs with these indices, in the order asked. Without a host name, the one host
    that has GPUs with all these indices."""
    wanted = ",".join(str(i) for i in indices)
    if host_name:
        host = host_named(host_name)
        found = {gpu.index: gpu for gpu in Gpu.objects.filter(host=host, index__in=indices)}
        missing = [i for i in indices if i not in found]
        if missing:
            raise LoadRefused(f"host {host.name} has no GPU {missing[0]}", field="gpu_id")
        return host, [found[i] for i in indices]
    by_host: dict[str, dict[int, Gpu]] = defaultdict(dict)
    for gpu in Gpu.objects.filter(index__in=indices).select_related("host"):
        by_host[gpu.host.name][gpu.index] = gpu
    complete = sorted(name for name, found in by_host.items() if len(found) == len(indices))
    if len(complete) == 1:
        found = by_host[complete[0]]
        return found[indices[0]].host, [found[i] for i in indices]
    if complete:
        raise LoadRefused(
            f"GPU {wanted} exists on several hosts ({', '.join(complete)}): say which host", field="host"
        )
    known = {i for found in by_host.values() for i in found}
    unknown = [i for i in indices if i not in known]
    if unknown:
        raise LoadRefused(f"unknown GPU {unknown[0]}", field="gpu_id")
    raise LoadRefused(f"GPUs {wanted} are not on one host: an instance uses GPUs of one host", field="gpu_id")


def check_host_up(host: Host, what: str = "load") -> None:
    """Loads and unloads go to the host's worker: refuse them (409, naming the host) while it is down."""
    if not host.is_up:
        raise LoadRefused(
            f"cannot {what}: host {host.name} is down ({host.down_reason()}); "
            "its worker must answer again first",
            field="host",
            code="busy",
        )


def _holders(gpus: list[Gpu]) -> list[InstanceGpu]:
    return list(
        InstanceGpu.objects.filter(gpu__in=gpus, active=True).select_related("instance__model", "gpu")
    )


def _busy(gpus: list[Gpu]) -> LoadRefused:
    holders = _holders(gpus)
    if not holders:  # released in the meantime: still, the request lost the race
        return LoadRefused(
            "GPU busy: another request claimed it at the same moment", field="gpu_id", code="busy"
        )
    link = holders[0]
    return LoadRefused(
        f"GPU busy: GPU {link.gpu.index} on {link.gpu.host.name} is held by instance #{link.instance_id} "
        f"({link.instance.model_id}, {link.instance.status}); unload or switch it first",
        field="gpu_id",
        code="busy",
    )


def check_gpu_state(gpus: list[Gpu], *, force: bool, prediction=None) -> str:
    """Refuse GPUs the telemetry says cannot be used: `unavailable` always (with the reason), and
    `occupied_by_others` unless the model is predicted to fit beside those processes (`prediction`, from
    models_app.estimates) or the caller forces, naming the foreign processes. Returns what a forced load
    goes over, for the event ("" when nothing)."""
    forced = []
    for position, gpu in enumerate(gpus):
        where = f"GPU {gpu.index} on {gpu.host.name}"
        if gpu.state == Gpu.State.UNAVAILABLE:
            reason = gpu.state_reason or "the GPU query failed"
            raise LoadRefused(f"{where} is unavailable: {reason}", field="gpu_id", code="busy")
        if gpu.state == Gpu.State.OCCUPIED_BY_OTHERS:
            foreign = [p for p in gpu.processes or [] if p.get("owner") != "instance"]
            named = (
                ", ".join(
                    f"{p.get('name') or '?'} (pid {p.get('pid')}, {p.get('used_mib')} MiB)"
                    for p in foreign[:5]
                )
                or f"{gpu.memory_used_mib} MiB used by processes not visible here"
            )
            after = (
                prediction.free_after_mib[position]
                if prediction is not None and prediction.estimate
                else None
            )
            if after is not None and after >= 0:
                continue  # fits beside them: no force needed
            if not force:
                why = ""
                if after is not None:
                    why = (
                        f"; the model needs ≈ {prediction.per_gpu_mib[position]} MiB there and "
                        f"{prediction.free_mib[position]} MiB are free"
                    )
                raise LoadRefused(
                    f"{where} is occupied by other processes: {named}{why}; load with force to use it anyway",
                    field="gpu_id",
                    code="busy",
                )
            forced.append(f"{where}: {named}")
    return "; ".join(forced)


def predict_load(model, gpus: list[Gpu], *, freed_mib: dict[int, int] | None = None):
    """The memory prediction for a load (models_app.estimates); None when it cannot be made, which never
    stops a load."""
    from . import estimates

    try:
        return estimates.predict(model, gpus, freed_mib=freed_mib)
    except Exception:  # a prediction is advice: a bug in it must not block loading
        logger.exception("memory prediction for %s failed", model.pk)
        return None


def check_fit(prediction, *, force: bool) -> str:
    """Refuse a load predicted not to fit (409, with the numbers) unless forced; returns what a forced load
    goes over, for the event."""
    if prediction is None or prediction.fits is not False:
        return ""
    message = f"{prediction.model_id} is predicted not to fit: {prediction.summary()}"
    if not force:
        raise LoadRefused(f"{message}; load with force to try anyway", field="gpu_id", code="busy")
    return message


def _estimate_fields(prediction) -> dict:
    if prediction is None or prediction.estimate is None:
        return {}
    return {"memory_estimated_mb": prediction.total_mib, "memory_estimate": prediction.stored()}


# --- the broker ----------------------------------------------------------------------------------------


def check_broker() -> None:
    """A fast ping, before anything is written: a request the worker would never see is refused."""
    error = health.broker_error(settings.CELERY_BROKER_URL, max_age=0)
    if error is not None:
        raise LoadRefused(f"the task queue (Redis) is unreachable: {error}", code="unavailable")


def _actor_id(actor) -> int | None:
    return actor.pk if actor is not None and getattr(actor, "is_authenticated", False) else None


# --- load ----------------------------------------------------------------------------------------------


def _create_pending(
    model, host, gpus, actor, *, event_kind: str, detail: str, on_demand: bool = False, prediction=None
) -> GpuInstance:
    """Insert the instance and its GPU claims; the partial unique indexes refuse a GPU already held (and a
    second load on demand of one model)."""
    owner = actor if _actor_id(actor) else None
    try:
        with transaction.atomic():
            instance = GpuInstance.objects.create(
                model=model,
                host=host,
                gpu_ids=",".join(str(g.index) for g in gpus),
                owner=owner,
                loaded_on_demand=on_demand,
                **_estimate_fields(prediction),
            )
    except IntegrityError:
        raise _Busy() from None
    try:
        with transaction.atomic():
            InstanceGpu.objects.bulk_create(
                [InstanceGpu(instance=instance, gpu=gpu, position=n) for n, gpu in enumerate(gpus)]
            )
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
) -> GpuInstance:
    """Validate, create a pending instance holding the GPUs with its memory estimate, and (on commit) queue its
    load. A load predicted not to fit the GPUs' free memory is refused with the numbers (409). `force`: load
    anyway, onto GPUs that other processes occupy or where it is predicted not to fit (recorded in the event). `on_demand`: a load the gateway asked
    for (models_app.ondemand, which has checked who may wake the model); idle unload applies to it, and
    only one such load of a model is under way at a time. `note` is added to the event."""
    if not on_demand:
        _check_actor(can_load(actor), actor, "load models")
    model = _model(model_id)
    host, gpus = resolve_gpus(parse_gpu_spec(gpu_spec), host_name)
    check_host_up(host)
    check_model_on_host(model, host)
    if _holders(gpus):
        raise _busy(gpus)
    prediction = predict_load(model, gpus)
    forced = check_gpu_state(gpus, force=force, prediction=prediction)
    over_fit = check_fit(prediction, force=force)
    check_broker()
    detail = f"load {model.pk} on {host.name} GPU {','.join(str(g.index) for g in gpus)}"
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
            return _create_pending(
                model,
                host,
                gpus,
                actor,
                event_kind=Kind.REQUESTED,
                detail=detail,
                on_demand=on_demand,
                prediction=prediction,
            )
    except _Busy:
        raise _busy(gpus) from None


AUTO = "auto"  # what the CLI's --gpu (and the API's gpu_id) may say instead of GPU indices


def request_load_auto(
    *, model_id: str, actor, host_name: str | None = None, force: bool = False
) -> GpuInstance:
    """A load without GPUs: the controller picks the host (or, with `host_name`, that host's GPUs) with
    placement.choose_gpus, as the load form's suggestion and the gateway's load on demand do, then loads as
    request_load does. Nothing fits: 409 with what keeps each GPU busy."""
    from . import placement
    from .ondemand import NoCapacity  # ondemand imports this module

    _check_actor(can_load(actor), actor, "load models")
    model = _model(model_id)
    host = None
    if host_name:
        host = host_named(host_name)
        check_host_up(host)
        check_model_on_host(model, host)
    try:
        host, gpus = placement.choose_gpus(model, host=host)
    except NoCapacity as exc:
        raise LoadRefused(exc.message, field="gpu_id", code="busy") from None
    return request_load(
        model_id=model.pk,
        gpu_spec=",".join(str(g.index) for g in gpus),
        actor=actor,
        host_name=host.name,
        force=force,
        note="GPUs chosen by the controller",
    )


# --- unload --------------------------------------------------------------------------------------------


def request_unload(
    *, instance: GpuInstance, actor, detail: str = "", event_kind: str = Kind.UNLOAD_REQUESTED
) -> GpuInstance:
    """Mark the instance stopping and queue the stop. Asking again while it stops is not an error.
    `detail`: why, for the event (e.g. "idle for 30 min"); `event_kind`: IDLE_UNLOAD for the idle timer."""
    _check_actor(can_manage_instance(actor, instance), actor, f"unload instance #{instance.pk}")
    instance.refresh_from_db()
    if instance.status == Status.STOPPING:
        return instance
    if not instance.is_active:
        raise LoadRefused(f"instance #{instance.pk} is not loaded (it is {instance.status})")
    check_host_up(instance.host, f"unload instance #{instance.pk}")
    check_broker()
    with transaction.atomic():
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
            raise LoadRefused(f"instance #{instance.pk} is not loaded (it is {instance.status})")
        dispatch.send_unload(instance, _actor_id(actor), at_once=False)
    return instance


def _active_on(gpus: list[Gpu]) -> list[GpuInstance]:
    ids = {link.instance_id for link in _holders(gpus)}
    return list(GpuInstance.objects.filter(pk__in=ids).select_related("model", "host").order_by("pk"))


def request_unload_gpus(*, gpu_spec: str, actor, host_name: str | None = None) -> list[GpuInstance]:
    """Unload whatever runs on these GPUs. The actor must be allowed to manage every one of them."""
    host, gpus = resolve_gpus(parse_gpu_spec(gpu_spec), host_name)
    instances = _active_on(gpus)
    if not instances:
        raise LoadRefused(
            f"nothing is loaded on {host.name} GPU {gpu_spec}", field="gpu_id", code="not_found"
        )
    for instance in instances:
        _check_actor(can_manage_instance(actor, instance), actor, f"unload instance #{instance.pk}")
    return [request_unload(instance=instance, actor=actor) for instance in instances]


# --- switch --------------------------------------------------------------------------------------------


def request_switch(
    *, model_id: str, gpu_spec: str, actor, host_name: str | None = None, force: bool = False
) -> GpuInstance:
    """Unload what runs on these GPUs and load `model_id` there, as one request. The GPUs pass to the new
    instance at once (so nobody else takes them in between); its load stops the old processes first."""
    _check_actor(can_load(actor), actor, "load models")
    model = _model(model_id)
    host, gpus = resolve_gpus(parse_gpu_spec(gpu_spec), host_name)
    check_host_up(host, "switch")
    check_model_on_host(model, host)
    old = _active_on(gpus)
    for instance in old:
        _check_actor(can_manage_instance(actor, instance), actor, f"unload instance #{instance.pk}")
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
            return _create_pending(
                model, host, gpus, actor, event_kind=Kind.SWITCH_REQUESTED,
                detail=f"switch {host.name} GPU {spec} to {model.pk}, replacing {replaced}",
                prediction=prediction,
            )  # fmt: skip
    except _Busy:
        raise _busy(gpus) from None


# --- orphans -------------------------------------------------------------------------------------------


def kill_orphan(*, gpu: Gpu, pid: int, actor) -> None:
    """Ask the GPU's host's worker to kill an orphan llama-server: one that the GPU's latest telemetry lists
    as an orphan (running one of the host's llama-server binaries, owned by no active instance). Refused
    (404 not listed, 409 listed as something else) otherwise; the worker checks all of it again, with the
    process's create time, right before the kill."""
    _check_actor(can_administer(actor), actor, "kill processes")
    try:
        pid = int(pid)
    except (TypeError, ValueError):
        raise LoadRefused(f"pid {pid!r} is not a number", field="pid") from None
    if pid <= 1:
        raise LoadRefused(f"pid {pid} is not a process that can be killed", field="pid")
    refusal = gpu_services.why_not_orphan(gpu, pid)
    if refusal is not None:
        code, reason = refusal
        raise LoadRefused(reason, field="pid", code=code)
    host = gpu.host
    check_broker()
    try:
        dispatch.send_kill_orphan(host, pid, _actor_id(actor), gpu.pk, at_once=True)
    except Exception as exc:  # the broker went away since the ping
        raise LoadRefused(f"the task queue (Redis) is unreachable: {exc}", code="unavailable") from None
