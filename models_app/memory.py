"""The seed's memory figures: which GPUs and processes belong to which instance (handed to `gpus` as plain
values), and the figures written back onto the instances."""

import logging
import os
from datetime import timedelta
from pathlib import Path

from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from gpus import alerts as gpu_alerts
from gpus import services as gpu_services
from gpus.alert_rules import InstanceFacts
from gpus.models import AlertRule
from gpus.telemetry import process_trees
from utilities.dbutil import update_rows

from . import binaries, estimator
from .events import record
from .models import GpuInstance, InstanceEvent, InstanceGpu
from .processes import is_alive
from .state import NO_MEMORY

logger = logging.getLogger(__name__)
AlertKind = AlertRule.Kind

Status = GpuInstance.Status


def active_claims(host_name: str) -> list[gpu_services.InstanceClaim]:
    """The active instances of a host with their GPUs and process trees (one query)."""
    links = (
        InstanceGpu.objects.filter(active=True, instance__host__name=host_name)
        .order_by("instance_id", "position")
        .values_list(
            "instance_id", "gpu_id", "instance__status", "instance__pid", "instance__process_create_time"
        )
    )
    by_instance: dict[int, dict] = {}
    for instance_id, gpu_pk, status, pid, create_time in links:
        entry = by_instance.setdefault(
            instance_id, {"gpus": [], "status": status, "pid": pid, "create_time": create_time}
        )
        entry["gpus"].append(gpu_pk)
    live = [e["pid"] for e in by_instance.values() if is_alive(e["pid"], e["create_time"])]
    trees = process_trees(live)
    return [
        gpu_services.InstanceClaim(
            instance_id=instance_id,
            gpu_pks=tuple(entry["gpus"]),
            pids=frozenset(trees.get(entry["pid"], ())),
            measure=entry["status"] in (Status.RUNNING, Status.STOPPING),
        )
        for instance_id, entry in by_instance.items()
    ]


def refresh_host_memory(
    host_name: str, sampled: gpu_services.Sampled | None = None
) -> list[gpu_services.InstanceMemory]:
    """One refresh cycle for a host: sample its GPUs once, update GPU rows and samples, and store each
    running instance's figure. A failed GPU query keeps the last figures and marks them "none" (N/A).
    `sampled`: a GPU sample already taken (the benchmark times the controller's own share)."""
    sampled = sampled or gpu_services.sample_gpus()  # the GPU query runs outside any transaction
    claims = active_claims(host_name)
    # One transaction for the cycle's writes: one commit (one WAL flush) instead of one per statement.
    with transaction.atomic():
        figures = gpu_services.refresh_host(
            host_name, claims, sampled, llama_servers=binaries.known_paths(host_name)
        )
        _store_figures(figures)
    evaluate_alerts(host_name)
    return figures


def refresh_live(host_name: str, sampled: gpu_services.Sampled | None = None) -> gpu_services.Sampled:
    """The live figures between two full refreshes (models_app/live.py): the GPU rows and the running
    instances' memory, from one sample, in one short transaction. No history sample, no alert: those stay at
    the full refresh's rate. Returns the sample (its `error` says whether the query failed)."""
    sampled = sampled or gpu_services.sample_gpus()
    if sampled.readings is None:
        return sampled
    claims = active_claims(host_name)
    with transaction.atomic():
        figures = gpu_services.refresh_live(
            host_name, claims, sampled, llama_servers=binaries.known_paths(host_name)
        )
        _store_figures(figures)
    return sampled


def evaluate_alerts(host_name: str) -> list[gpu_alerts.Transition]:
    """Right after the refresh: the host's alert rules over its fresh rows, with the instance facts they need
    handed to `gpus` as plain values. An error here is logged, never fails the refresh."""
    try:
        transitions = gpu_alerts.evaluate_host(host_name, instance_facts(host_name))
        _record_alert_events(transitions)
        return transitions
    except Exception:
        logger.exception("alert evaluation failed on %s", host_name)
        return []


ALERT_EVENT_KINDS = {"fired": InstanceEvent.Kind.ALERT_FIRED, "resolved": InstanceEvent.Kind.ALERT_RESOLVED}


def _record_alert_events(transitions: list[gpu_alerts.Transition]) -> None:
    """Alerts that fire or resolve join the audit trail (the events page, the API); an instance's alerts
    also join its timeline."""
    for t in transitions:
        kind = ALERT_EVENT_KINDS[t.event]
        instance = GpuInstance.objects.filter(pk=t.instance_id).first() if t.instance_id else None
        record(kind, instance=instance, detail=f"{t.rule_name}: {t.message}"[:1000])


def instance_facts(host_name: str) -> list[InstanceFacts]:
    """The host's running instances, those that crashed within the crash rules' window (two queries, the
    (host, status) index) and, where an eviction rule is enabled, those evicted within its window."""
    windows = gpu_alerts.instance_windows()
    crashed_since = timezone.now() - windows.get(AlertKind.INSTANCE_CRASHED, timedelta(0))
    rows = list(
        GpuInstance.objects.filter(host__name=host_name)
        .filter(Q(status=Status.RUNNING) | Q(status=Status.CRASHED, stopped_at__gte=crashed_since))
        .values_list("id", "model__name", "gpu_ids", "status", "stopped_at")
    )
    gpus: dict[int, list[int]] = {}
    links = InstanceGpu.objects.filter(instance_id__in=[r[0] for r in rows]).order_by(
        "instance_id", "position"
    )
    for instance_id, gpu_pk in links.values_list("instance_id", "gpu_id"):
        gpus.setdefault(instance_id, []).append(gpu_pk)
    return [
        InstanceFacts(
            instance_id=pk,
            label=f"{model_name} (#{pk}) on {host_name} GPU {gpu_ids}",
            gpu_pks=tuple(gpus.get(pk, ())),
            status=status,
            ended_at=stopped_at,
        )
        for pk, model_name, gpu_ids, status, stopped_at in rows
    ] + evicted_facts(host_name, windows.get(AlertKind.INSTANCE_EVICTED))


def evicted_facts(host_name: str, window: timedelta | None) -> list[InstanceFacts]:
    """The host's instances evicted within `window` (the eviction rules'), with the eviction's sentence (none
    without such a rule: no query)."""
    if window is None:
        return []
    events = InstanceEvent.objects.filter(
        kind=InstanceEvent.Kind.EVICTED,
        instance__host__name=host_name,
        created_at__gte=timezone.now() - window,
    ).values_list("instance_id", "instance__gpu_ids", "instance__status", "created_at", "detail")
    return [
        InstanceFacts(
            instance_id=pk,
            label=f"instance #{pk} on {host_name} GPU {gpu_ids}",
            gpu_pks=(),
            status=status,
            ended_at=created_at,
            evicted=detail,
        )
        for pk, gpu_ids, status, created_at, detail in events
    ]


def _store_figures(figures: list[gpu_services.InstanceMemory]) -> None:
    known = [f for f in figures if f.source != GpuInstance.MemorySource.NONE]
    unknown = [f.instance_id for f in figures if f.source == GpuInstance.MemorySource.NONE]
    if known:
        update_rows(
            [
                GpuInstance(
                    pk=f.instance_id,
                    memory_used_mb=f.used_mib,
                    memory_total_mb=f.total_mib,
                    memory_source=f.source,
                    memory_updated_at=f.taken_at,
                )
                for f in known
            ],
            ["memory_used_mb", "memory_total_mb", "memory_source", "memory_updated_at"],
        )
        # One that stopped after the claims were read keeps no figure (state.transition cleared it).
        GpuInstance.objects.filter(pk__in=[f.instance_id for f in known]).exclude(
            status__in=GpuInstance.ACTIVE_STATUSES
        ).update(**NO_MEMORY)
    if unknown:
        GpuInstance.objects.filter(pk__in=unknown).update(memory_source=GpuInstance.MemorySource.NONE)


def measure_after_load(instance: GpuInstance) -> None:
    """The seed's post-load memory query: one refresh of the host, then the figure is on the instance."""
    refresh_host_memory(instance.host.name)
    instance.refresh_from_db(
        fields=["memory_used_mb", "memory_total_mb", "memory_source", "memory_updated_at"]
    )
    if instance.memory_source == GpuInstance.MemorySource.NONE:
        detail = f"Model {instance.model_id} loaded on GPU {instance.gpu_ids}: memory N/A (GPU query failed)"
    else:
        detail = (
            f"Model {instance.model_id} loaded on GPU {instance.gpu_ids}: "
            f"{instance.memory_used_mb} MiB / {instance.memory_total_mb} MiB ({instance.memory_source})"
        )
    logger.info(detail)
    record(InstanceEvent.Kind.MEMORY, instance=instance, detail=detail)
    check_estimate(instance)


def check_estimate(instance: GpuInstance) -> None:
    """The estimate the load was asked with against what was measured after it: the error is a field and an
    event, and the measured figure teaches the next estimate of the model on this kind of GPU
    (models_app.estimates.calibration)."""
    if not instance.memory_estimated_mb or instance.memory_source == GpuInstance.MemorySource.NONE:
        return
    if instance.memory_used_mb is None:
        return
    measured, estimated = instance.memory_used_mb, instance.memory_estimated_mb
    error = round((measured - estimated) * 100 / estimated, 1)
    stored = dict(instance.memory_estimate or {})
    opinion = fit_params_opinion(instance, stored)
    if opinion is not None:
        stored["fit_params"] = opinion
    GpuInstance.objects.filter(pk=instance.pk).update(
        memory_measured_mb=measured, memory_estimate_error_pct=error, memory_estimate=stored
    )
    instance.memory_measured_mb, instance.memory_estimate_error_pct = measured, error
    instance.memory_estimate = stored
    learned = stored.get("correction") or {}
    basis = f", corrected from {learned['loads']} loads" if learned.get("loads") else ""
    record(
        InstanceEvent.Kind.ESTIMATE,
        instance=instance,
        detail=(
            f"estimated {estimated} MiB{basis} (formula {stored.get('formula_mib', '?')} MiB), "
            f"measured {measured} MiB ({instance.memory_source}): error {error:+.1f} %"
            + (_opinion_text(opinion) if opinion else "")
        ),
    )


def _opinion_text(opinion: list[dict]) -> str:
    total = sum(d["model_mib"] + d["context_mib"] + d["compute_mib"] for d in opinion)
    return f"; llama-fit-params says {total:.0f} MiB (without the CUDA context)"


def fit_params_opinion(instance: GpuInstance, stored: dict) -> list[dict] | None:
    """llama.cpp's own estimate of this load (`llama-fit-params --fit-print on` next to the instance's
    llama-server, same settings, same GPUs), stored beside ours as a second opinion; None where the build
    has no such tool. Runs in the worker after the load, never in a request."""
    settings_used = (stored.get("breakdown") or {}).get("settings") or {}
    if not instance.argv or not settings_used:
        return None
    args = ["-c", str(settings_used["n_ctx"]), "-ngl", str(settings_used["n_gpu_layers"])]
    args += ["-ub", str(settings_used["n_ubatch"]), "-b", str(settings_used["n_batch"])]
    args += ["-ctk", settings_used["cache_k"], "-ctv", settings_used["cache_v"]]
    args += ["-fa", "on" if settings_used["flash_attn"] else "off"]
    args += [] if settings_used["kv_unified"] else ["-np", str(settings_used["n_seq"])]
    uuids = list(instance.gpu_links.order_by("position").values_list("gpu__uuid", flat=True))
    environment = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LD_LIBRARY_PATH")}
    environment["CUDA_VISIBLE_DEVICES"] = ",".join(uuids)
    try:
        return estimator.fit_params(
            str(Path(instance.argv[0]).parent), instance.model.path, args, timeout=20, env=environment
        )
    except Exception:  # a second opinion is a nicety
        logger.exception("llama-fit-params failed for instance %s", instance.pk)
        return None
