"""What a load, unload or switch must pass before anything is recorded: the GPU list, the host and its GPUs,
the model and its file, who asks, the GPUs' state, the memory prediction and the task queue. Each check
raises models_app.errors.Refused with the reason; models_app.services runs them and records the request."""

import logging
import re
from collections import defaultdict

from django.conf import settings

from gpus.models import Gpu, Host
from utilities.dbutil import select, select_one

from . import estimates, health, model_files
from .errors import Refused
from .models import InstanceGpu, ModelConfig
from .registry import RegistryError, check_model_path, check_model_path_form

logger = logging.getLogger(__name__)

MAX_GPUS_PER_INSTANCE = 64
MAX_GPU_INDEX = 1023  # larger ids are refused before they reach the database (30 digits overflowed it)

_GPU_ID = re.compile(r"[0-9]+")


def parse_gpu_spec(spec) -> list[int]:
    """ "0,1" -> [0, 1]. Refuses empty, negative, non-numeric and repeated ids."""
    text = "" if spec is None else str(spec).strip()
    if not text:
        raise Refused("no GPU given: use an index such as 0, or 0,1", field="gpu_id")
    ids: list[int] = []
    for raw in text.split(","):
        token = raw.strip()
        if not token:
            raise Refused(f"GPU list {text!r} has an empty entry", field="gpu_id")
        if not _GPU_ID.fullmatch(token):
            what = "negative" if re.fullmatch(r"-[0-9]+", token) else "not a number"
            raise Refused(f"GPU id {token!r} is {what}: use indices such as 0 or 0,1", field="gpu_id")
        if len(token.lstrip("0")) > len(str(MAX_GPU_INDEX)) or int(token) > MAX_GPU_INDEX:
            raise Refused(
                f"GPU id {token!r} is too large: GPU indices go up to {MAX_GPU_INDEX}", field="gpu_id"
            )
        value = int(token)
        if value in ids:
            raise Refused(f"GPU {value} is listed twice in {text!r}", field="gpu_id")
        ids.append(value)
    if len(ids) > MAX_GPUS_PER_INSTANCE:
        raise Refused(f"at most {MAX_GPUS_PER_INSTANCE} GPUs per instance", field="gpu_id")
    return ids


def check_actor(allowed: bool, actor, what: str) -> None:
    """Refuse (403) an actor whose role does not allow `what`; None (the system) may do anything."""
    if actor is not None and not allowed:
        raise Refused(f"{actor.get_username()} may not {what}", code="forbidden")


def model_to_load(model_id: str) -> ModelConfig:
    """The model of that id, with its file checked (its form only, where the hosts' workers report it)."""
    # One plain statement (utilities.dbutil), as select_related("binary") reads it: on every load's way.
    model = select_one(ModelConfig, str(model_id or ""), ("binary",))
    if model is None:
        raise Refused(f"unknown model {model_id!r}", field="model_id")
    model.host_reports = model_files.reports(model)  # for check_model_on_host: not read again
    try:
        if model.host_reports:
            # The hosts' workers report the file (checked per host in check_model_on_host); the web node
            # need not have it, so only the path's form is checked here.
            check_model_path_form(model.path)
        else:  # nothing reported yet (a single machine, or no worker has started): check it here
            check_model_path(model.path)
    except RegistryError as exc:
        raise Refused(f"model {model.pk}: {exc}", field="model_id") from None
    return model


def check_model_on_host(model: ModelConfig, host: Host) -> None:
    """Refuse up front (409) a load on a host whose worker reported that it cannot serve the model, with its
    reason. No report yet: accepted (the worker checks the file again when it loads)."""
    reason = model_files.refusal(model, host, getattr(model, "host_reports", None))
    if reason:
        raise Refused(reason, field="model_id", code="busy")


def host_named(host_name: str, code: str = "invalid") -> Host:
    """The host of that name, or Refused ("unknown host", field host)."""
    found = select(Host, {"name": host_name}, limit=1)  # names are unique
    if not found:
        raise Refused(f"unknown host {host_name!r}", field="host", code=code)
    return found[0]


def resolve_gpus(indices: list[int], host_name: str | None) -> tuple[Host, list[Gpu]]:
    """The host and its GPUs with these indices, in the order asked. Without a host name, the one host
    that has GPUs with all these indices."""
    wanted = ",".join(str(i) for i in indices)
    if host_name:
        host = host_named(host_name)
        found = {gpu.index: gpu for gpu in select(Gpu, {"host_id": host.pk, "index__in": indices})}
        for gpu in found.values():
            gpu.host = host  # the checks name it: not read once per GPU
        missing = [i for i in indices if i not in found]
        if missing:
            raise Refused(f"host {host.name} has no GPU {missing[0]}", field="gpu_id")
        return host, [found[i] for i in indices]
    by_host: dict[str, dict[int, Gpu]] = defaultdict(dict)
    gpus = select(Gpu, {"index__in": indices})
    hosts = {h.pk: h for h in select(Host, {"pk__in": sorted({g.host_id for g in gpus})})} if gpus else {}
    for gpu in gpus:
        gpu.host = hosts[gpu.host_id]
        by_host[gpu.host.name][gpu.index] = gpu
    complete = sorted(name for name, found in by_host.items() if len(found) == len(indices))
    if len(complete) == 1:
        found = by_host[complete[0]]
        return found[indices[0]].host, [found[i] for i in indices]
    if complete:
        raise Refused(
            f"GPU {wanted} exists on several hosts ({', '.join(complete)}): say which host", field="host"
        )
    known = {i for found in by_host.values() for i in found}
    unknown = [i for i in indices if i not in known]
    if unknown:
        raise Refused(f"unknown GPU {unknown[0]}", field="gpu_id")
    raise Refused(f"GPUs {wanted} are not on one host: an instance uses GPUs of one host", field="gpu_id")


def check_host_up(host: Host, what: str = "load") -> None:
    """Loads and unloads go to the host's worker: refuse them (409, naming the host) while it is down."""
    if not host.is_up:
        raise Refused(
            f"cannot {what}: host {host.name} is down ({host.down_reason()}); "
            "its worker must answer again first",
            field="host",
            code="busy",
        )


def holders(gpus: list[Gpu]) -> list[InstanceGpu]:
    """The active instances' claims on these GPUs."""
    return list(
        InstanceGpu.objects.filter(gpu__in=gpus, active=True).select_related("instance__model", "gpu")
    )


def busy(gpus: list[Gpu]) -> Refused:
    """The 409 for GPUs that are held, naming what holds them."""
    links = holders(gpus)
    if not links:  # released in the meantime: still, the request lost the race
        return Refused("GPU busy: another request claimed it at the same moment", field="gpu_id", code="busy")
    link = links[0]
    return Refused(
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
            raise Refused(f"{where} is unavailable: {reason}", field="gpu_id", code="busy")
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
                raise Refused(
                    f"{where} is occupied by other processes: {named}{why}; load with force to use it anyway",
                    field="gpu_id",
                    code="busy",
                )
            forced.append(f"{where}: {named}")
    return "; ".join(forced)


def predict_load(model, gpus: list[Gpu], *, freed_mib: dict[int, int] | None = None):
    """The memory prediction for a load (models_app.estimates); None when it cannot be made, which never
    stops a load."""
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
        raise Refused(f"{message}; load with force to try anyway", field="gpu_id", code="busy")
    return message


def estimate_fields(prediction) -> dict:
    """The instance's columns that keep the prediction it was loaded with."""
    if prediction is None or prediction.estimate is None:
        return {}
    return {"memory_estimated_mb": prediction.total_mib, "memory_estimate": prediction.stored()}


# --- the broker ----------------------------------------------------------------------------------------


def check_broker() -> None:
    """A fast ping, before anything is written: a request the worker would never see is refused."""
    error = health.broker_error(settings.CELERY_BROKER_URL, max_age=0)
    if error is not None:
        raise Refused(f"the task queue (Redis) is unreachable: {error}", code="unavailable")


def actor_id(actor) -> int | None:
    return actor.pk if actor is not None and getattr(actor, "is_authenticated", False) else None
