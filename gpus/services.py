"""Inventory, sampling and memory attribution for one host.

`gpus` knows nothing of model instances: the caller hands in what it needs as plain values
(`InstanceClaim`: which GPUs an instance holds and which PIDs are its process tree) and gets plain
figures back (`InstanceMemory`). The GPU query runs before any database work, never inside a transaction.
"""

import logging
import os
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta

import psutil
from django.conf import settings
from django.db import transaction
from django.utils import timezone

from utilities.dbutil import update_rows

from .models import Gpu, Host, MemorySample
from .telemetry import GpuReading, TelemetryBackend, TelemetryError, get_backend, sample_with_timeout

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceClaim:
    instance_id: int
    gpu_pks: tuple[int, ...]  # Gpu primary keys, in the instance's order
    pids: frozenset[int]  # the instance's process tree; empty when no process is known
    measure: bool = True  # False: the GPU counts as ours, but no memory figure is wanted (still starting)


@dataclass(frozen=True)
class InstanceMemory:
    instance_id: int
    used_mib: int | None
    total_mib: int | None
    source: str  # "process" | "device" | "none"
    taken_at: datetime | None


@dataclass
class Sampled:
    readings: list[GpuReading] | None
    error: str
    backend: str
    taken_at: datetime
    sample_ms: float


# --- the backend, one per process ------------------------------------------------------------------

_backend_lock = threading.Lock()
_backend: TelemetryBackend | None = None
_backend_key: tuple | None = None


def current_backend() -> TelemetryBackend:
    """The configured backend, started once per process (NVML initialises once and keeps handles)."""
    global _backend, _backend_key
    key = (settings.GPU_BACKEND, settings.FAKE_GPUS_FILE, settings.GPU_QUERY_TIMEOUT)
    with _backend_lock:
        if _backend is None or _backend_key != key:
            _backend = get_backend(
                settings.GPU_BACKEND,
                fake_gpus_path=settings.FAKE_GPUS_FILE or None,
                smi_timeout=settings.GPU_QUERY_TIMEOUT,
            )
            _backend_key = key
        return _backend


def sample_gpus() -> Sampled:
    """One pass over every GPU of this host. Never raises: a failure comes back as `error`."""
    import time

    taken_at = timezone.now()
    started = time.perf_counter()
    try:
        backend = current_backend()
        # A little more than the backend's own timeout, so nvidia-smi reports its own text first.
        readings = sample_with_timeout(backend, timeout=settings.GPU_QUERY_TIMEOUT + 1)
        name, error = backend.name, ""
    except TelemetryError as exc:
        readings, name, error = None, settings.GPU_BACKEND, str(exc) or "GPU query failed"
    except Exception as exc:  # a misconfigured backend (bad fake file path…) must not kill the worker
        readings, name, error = None, settings.GPU_BACKEND, f"{type(exc).__name__}: {exc}"
    return Sampled(readings, error, name, taken_at, (time.perf_counter() - started) * 1000)


# --- inventory -------------------------------------------------------------------------------------


def register_host(host_name: str, sampled: Sampled | None = None) -> Host:
    """A worker registers its host and its GPUs (by uuid) when it starts."""
    sampled = sampled or sample_gpus()
    host, _ = Host.objects.get_or_create(name=host_name)
    host.last_seen = sampled.taken_at
    host.telemetry_backend = sampled.backend
    host.telemetry_error = sampled.error
    host.save(update_fields=["last_seen", "telemetry_backend", "telemetry_error"])
    if sampled.readings is not None:
        known = list(host.gpus.all())
        if _inventory_changed(sampled.readings, known):
            _sync_inventory(host, sampled.readings, known)
    return host


def _inventory_changed(readings: list[GpuReading], known: list[Gpu]) -> bool:
    index_of = {gpu.uuid: gpu.index for gpu in known}
    return any(index_of.get(r.uuid, -1) != r.index for r in readings)


def _sync_inventory(host: Host, readings: list[GpuReading], known: list[Gpu]) -> list[Gpu]:
    """Bring the rows in line with what the driver reports: indices follow the uuids, and a GPU whose
    index another uuid now has (a replaced card) lets go of it: unavailable, no index. No two rows of a host
    ever answer to one index (the database's unique constraint holds it). Creates rows for GPUs seen for
    the first time, and returns them."""
    with transaction.atomic():
        _release_indices(host, readings)
        return _create_new(host, readings, known)


def _release_indices(host: Host, readings: list[GpuReading]) -> None:
    index_of = {r.uuid: r.index for r in readings}
    claimed_by = {r.index: r.uuid for r in readings}
    moving = []
    for gpu in Gpu.objects.filter(host=host).exclude(index=None).only("pk", "uuid", "index"):
        if gpu.uuid in index_of:
            if index_of[gpu.uuid] != gpu.index:
                moving.append(gpu)
        elif gpu.index in claimed_by:
            Gpu.objects.filter(pk=gpu.pk).update(
                index=None,
                state=Gpu.State.UNAVAILABLE,
                state_reason=f"replaced: GPU {gpu.index} of {host.name} is now {claimed_by[gpu.index]}",
                unavailable_cause=Gpu.Cause.NONE,
                processes=[],
            )
    # Renumbered GPUs (e.g. two swapped): let go of every old index first, then take the new ones.
    Gpu.objects.filter(pk__in=[g.pk for g in moving]).update(index=None)
    for gpu in moving:
        Gpu.objects.filter(pk=gpu.pk).update(index=index_of[gpu.uuid])
    # A GPU that moved from another host (a card swapped between machines) is re-homed by uuid.
    for gpu in Gpu.objects.filter(uuid__in=list(index_of)).exclude(host=host).only("pk", "uuid"):
        Gpu.objects.filter(pk=gpu.pk).update(host=host, index=index_of[gpu.uuid])


def _create_new(host: Host, readings: list[GpuReading], known: list[Gpu]) -> list[Gpu]:
    known_uuids = {gpu.uuid for gpu in known}
    new = [
        Gpu(
            host=host,
            index=r.index,
            uuid=r.uuid,
            name=r.name,
            simulated=r.simulated,
            memory_total_mib=r.memory_total_mib,
            state=Gpu.State.IDLE,
        )
        for r in readings
        if r.uuid not in known_uuids
    ]
    if new:
        existing = set(Gpu.objects.filter(uuid__in=[g.uuid for g in new]).values_list("uuid", flat=True))
        Gpu.objects.bulk_create([g for g in new if g.uuid not in existing])
        return list(Gpu.objects.filter(host=host, uuid__in=[g.uuid for g in new]))
    return []


# --- one refresh cycle -----------------------------------------------------------------------------


def attribute(claim: InstanceClaim, readings_by_pk: dict[int, GpuReading], taken_at) -> InstanceMemory:
    """The instance's own memory: per-process figures of its process tree on its GPUs, summed; where the
    backend has no per-process figure for it, the whole-GPU used memory of its GPUs (the seed's method)."""
    readings = [readings_by_pk.get(pk) for pk in claim.gpu_pks]
    if not readings or any(r is None for r in readings):
        return InstanceMemory(claim.instance_id, None, None, "none", None)
    total = sum(r.memory_total_mib for r in readings)
    ours = [p for r in readings for p in r.processes if p.pid is not None and p.pid in claim.pids]
    if ours and all(p.used_mib is not None for p in ours):
        return InstanceMemory(claim.instance_id, sum(p.used_mib for p in ours), total, "process", taken_at)
    # Not listed (PIDs the driver cannot map, e.g. in a container) or listed without a figure.
    return InstanceMemory(
        claim.instance_id, sum(r.memory_used_mib for r in readings), total, "device", taken_at
    )


def executable_of(pid: int | None) -> str | None:
    """The real path of the process's executable on this machine; None when it cannot be read (gone, another
    user's process, not on this machine). A process chooses its own name and arguments, not this."""
    if not pid:
        return None
    try:
        return os.path.realpath(psutil.Process(pid).exe()) or None
    except (psutil.Error, OSError, ValueError):
        return None


def _process_rows(reading: GpuReading, owner_of: dict[int, int], llama_servers: frozenset[str]) -> list[dict]:
    rows = []
    for p in reading.processes:
        instance_id = owner_of.get(p.pid) if p.pid is not None else None
        if instance_id is not None:
            owner = "instance"
        elif llama_servers and executable_of(p.pid) in llama_servers:
            # One of the host's own llama-server binaries on our GPU that no active instance owns. A name
            # proves nothing: any local user can call a process llama-server.
            owner = "orphan"
        else:
            owner = "foreign"
        rows.append(
            {"pid": p.pid, "name": p.name, "used_mib": p.used_mib, "owner": owner, "instance_id": instance_id}
        )
    return rows


def why_not_orphan(gpu: Gpu, pid: int) -> tuple[str, str] | None:
    """None when the GPU's latest telemetry lists `pid` as an orphan llama-server; else (code, reason):
    "not_found" when it does not list the pid at all, "busy" when it lists it as something else."""
    where = f"GPU {gpu.index} of {gpu.host.name}"
    listed = next((p for p in gpu.processes or [] if p.get("pid") == pid), None)
    if listed is None:
        when = f" at {timezone.localtime(gpu.updated_at):%H:%M:%S}" if gpu.updated_at else ""
        return "not_found", f"pid {pid} is not among the processes on {where} (latest telemetry{when})"
    if listed.get("owner") == "instance":
        return (
            "busy",
            f"pid {pid} on {where} belongs to instance #{listed.get('instance_id')}: unload it instead",
        )
    if listed.get("owner") != "orphan":
        return "busy", (
            f"pid {pid} on {where} ({str(listed.get('name') or 'unnamed')[:100]}) is not running one of the "
            "host's llama-server binaries: only those are killed as orphans"
        )
    return None


def _gpu_state(reading: GpuReading, ours: bool, processes: list[dict]) -> tuple[str, str]:
    if ours:
        return Gpu.State.MODEL_LOADED, ""
    if reading.memory_used_mib > settings.GPU_BUSY_MIB:
        foreign = [p for p in processes if p["owner"] != "instance"]
        names = ", ".join(f"{p['name']} ({p['pid']})" for p in foreign[:5]) or "processes not visible"
        return Gpu.State.OCCUPIED_BY_OTHERS, f"{reading.memory_used_mib} MiB used by others: {names}"
    return Gpu.State.IDLE, ""


def refresh_host(
    host_name: str,
    claims: list[InstanceClaim],
    sampled: Sampled | None = None,
    llama_servers: frozenset[str] = frozenset(),
):
    """Sample the host's GPUs once, update the Gpu rows, write one bulk of samples, and return the memory
    of each claimed instance. `llama_servers`: the real paths of the host's llama-server binaries (an
    unowned process running one of them is an orphan; runs on the host itself, which reads the processes). A failed query marks the GPUs unavailable and returns source "none" for
    every instance (the caller keeps their last figures). Database queries: a fixed handful, whatever the
    number of GPUs or instances."""
    sampled = sampled or sample_gpus()
    now = sampled.taken_at
    updated = Host.objects.filter(name=host_name).update(
        last_seen=now, telemetry_backend=sampled.backend, telemetry_error=sampled.error
    )
    if not updated:
        register_host(host_name, sampled)
    gpus = list(Gpu.objects.filter(host__name=host_name).order_by("pk"))

    if sampled.readings is None:
        logger.warning("GPU query failed on %s: %s", host_name, sampled.error)
        for gpu in gpus:
            gpu.state, gpu.state_reason, gpu.updated_at = Gpu.State.UNAVAILABLE, sampled.error, now
            gpu.unavailable_cause = Gpu.Cause.NONE
        update_rows(gpus, ["state", "state_reason", "unavailable_cause", "updated_at"])
        return [InstanceMemory(c.instance_id, None, None, "none", None) for c in claims if c.measure]

    by_uuid = {r.uuid: r for r in sampled.readings}
    if _inventory_changed(sampled.readings, gpus):
        host = gpus[0].host if gpus else Host.objects.get(name=host_name)
        _sync_inventory(host, sampled.readings, gpus)
        gpus = list(Gpu.objects.filter(host__name=host_name).order_by("pk"))

    owner_of = {pid: c.instance_id for c in claims for pid in c.pids}
    claimed_pks = {pk for c in claims for pk in c.gpu_pks}
    readings_by_pk: dict[int, GpuReading] = {}
    samples: list[MemorySample] = []
    for gpu in gpus:
        reading = by_uuid.get(gpu.uuid)
        gpu.updated_at = now
        if reading is None:
            if gpu.index is not None:  # a replaced GPU keeps the reason that names its successor
                gpu.state, gpu.state_reason = Gpu.State.UNAVAILABLE, "GPU not reported by the driver any more"
                gpu.unavailable_cause = Gpu.Cause.NONE
            gpu.processes = []
            continue
        readings_by_pk[gpu.pk] = reading
        _apply(gpu, reading, gpu.pk in claimed_pks, owner_of, llama_servers)
        samples.append(
            MemorySample(
                gpu=gpu, taken_at=now, used_mib=reading.memory_used_mib, total_mib=reading.memory_total_mib
            )
        )

    figures = [attribute(c, readings_by_pk, now) for c in claims if c.measure]
    samples += [
        MemorySample(instance_id=f.instance_id, taken_at=now, used_mib=f.used_mib, total_mib=f.total_mib)
        for f in figures
        if f.source != "none"
    ]
    update_rows(gpus, GPU_FIELDS)
    MemorySample.objects.bulk_create(samples)
    return figures


GPU_FIELDS = [
    "index", "name", "simulated", "memory_total_mib", "memory_used_mib", "utilization_pct",
    "temperature_c", "power_w", "processes", "state", "state_reason", "unavailable_cause", "updated_at",
]  # fmt: skip


def _apply(gpu: Gpu, reading: GpuReading, ours: bool, owner_of: dict[int, int], llama_servers) -> None:
    """A GPU row takes a reading: its figures, its processes (and whose each is), its state."""
    gpu.index, gpu.name, gpu.simulated = reading.index, reading.name, reading.simulated
    gpu.memory_total_mib, gpu.memory_used_mib = reading.memory_total_mib, reading.memory_used_mib
    gpu.utilization_pct = reading.utilization_pct
    gpu.temperature_c, gpu.power_w = reading.temperature_c, reading.power_w
    gpu.processes = _process_rows(reading, owner_of, llama_servers)
    gpu.state, gpu.state_reason = _gpu_state(reading, ours, gpu.processes)
    gpu.unavailable_cause = Gpu.Cause.NONE


def refresh_live(
    host_name: str, claims: list[InstanceClaim], sampled: Sampled, llama_servers: frozenset[str] = frozenset()
) -> list[InstanceMemory]:
    """The live figures between two full refreshes (models_app/live.py), inside the caller's transaction: GPU
    rows and instances' memory, no history sample, no heartbeat. Inventory and availability stay the full
    refresh's: a failed query, a changed inventory or an unavailable GPU (query failed, not reported, host down:
    rows locked, in admission's order, so a mark made meanwhile is not undone) leave the rows as they are.
    Returns the figures measured (those with source "none" keep their last). Two queries."""
    if sampled.readings is None:
        return []
    gpus = list(Gpu.objects.select_for_update(of=("self",)).filter(host__name=host_name).order_by("pk"))
    if _inventory_changed(sampled.readings, gpus):
        return []
    by_uuid = {r.uuid: r for r in sampled.readings}
    owner_of = {pid: c.instance_id for c in claims for pid in c.pids}
    claimed_pks = {pk for c in claims for pk in c.gpu_pks}
    readings_by_pk: dict[int, GpuReading] = {}
    live = []
    for gpu in gpus:
        reading = by_uuid.get(gpu.uuid)
        if reading is None or gpu.state == Gpu.State.UNAVAILABLE:
            continue
        readings_by_pk[gpu.pk] = reading
        gpu.updated_at = sampled.taken_at
        _apply(gpu, reading, gpu.pk in claimed_pks, owner_of, llama_servers)
        live.append(gpu)
    update_rows(live, GPU_FIELDS)
    figures = [attribute(c, readings_by_pk, sampled.taken_at) for c in claims if c.measure]
    return [f for f in figures if f.source != "none"]


def prune_samples(*, older_than_days: int | None = None, batch_size: int = 10_000) -> int:
    """Delete samples past the retention period in batches (short transactions, no table-wide lock)."""
    days = older_than_days or settings.SAMPLE_RETENTION_DAYS
    cutoff = timezone.now() - timedelta(days=days)
    deleted = 0
    while True:
        ids = list(MemorySample.objects.filter(taken_at__lt=cutoff).values_list("id", flat=True)[:batch_size])
        if not ids:
            return deleted
        deleted += MemorySample.objects.filter(id__in=ids).delete()[0]


# --- hosts that went quiet -------------------------------------------------------------------------


def mark_host_lost(host: Host, reason: str) -> int:
    """The host's worker went quiet: its GPUs are unavailable with `reason` until the host answers again
    (its next refresh sets their state from a reading) or an admin clears them. Records when on the host
    (the GPUs are marked once per silence). Returns the GPUs marked."""
    now = timezone.now()
    Host.objects.filter(pk=host.pk).update(gpus_marked_at=now)
    host.gpus_marked_at = now
    return Gpu.objects.filter(host=host).update(
        state=Gpu.State.UNAVAILABLE,
        state_reason=reason,
        unavailable_cause=Gpu.Cause.HOST_DOWN,
        updated_at=now,
    )


def clear_host_lost(host: Host) -> int:
    """An admin clears the marks that `mark_host_lost` left (cause HOST_DOWN): the GPUs count as idle until
    the host's next refresh. Returns the GPUs cleared."""
    return Gpu.objects.filter(
        host=host, state=Gpu.State.UNAVAILABLE, unavailable_cause=Gpu.Cause.HOST_DOWN
    ).update(
        state=Gpu.State.IDLE,
        state_reason="",
        unavailable_cause=Gpu.Cause.NONE,
        processes=[],
        updated_at=timezone.now(),
    )
