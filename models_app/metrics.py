"""Prometheus exposition at /metrics, built from database rows (never NVML in a request) by a custom
collector, so that a scrape costs a handful of queries whatever the number of GPUs.

Names. GPU device figures follow NVIDIA's DCGM exporter, so that existing DCGM dashboards and alerts work
unchanged: `DCGM_FI_DEV_FB_USED`, `DCGM_FI_DEV_FB_FREE`, `DCGM_FI_DEV_FB_TOTAL` (MiB, as DCGM reports them),
`DCGM_FI_DEV_GPU_UTIL` (percent), labelled `gpu`, `UUID`, `device`, `modelName`, `Hostname`. What DCGM does
not have — a model instance's own memory, per-process memory with its owner, states and alerts — is named
`llamacontroller_*` in base units (bytes), following the Prometheus naming guide as nvitop-exporter does
(`nvitop_gpu_memory_used_bytes`-style).

Access: a Bearer API token of any role (or a logged-in session with a role), or a client address in
LLAMACONTROLLER_METRICS_ALLOWED_ADDRESSES (IPs or CIDR networks, e.g. the Prometheus server) without one.
"""

import ipaddress

from django.conf import settings
from django.db.models import Count, Prefetch
from django.http import HttpResponse
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from rest_framework.exceptions import AuthenticationFailed

from accounts import roles
from accounts.authentication import BearerTokenAuthentication
from accounts.throttle import client_ip
from gpus.models import Alert, AlertRule, Gpu, Host

from . import admission
from .models import GpuInstance, InstanceGpu

MIB = 1024 * 1024
GPU_LABELS = ["gpu", "UUID", "device", "modelName", "Hostname"]
INSTANCE_LABELS = ["instance_id", "model", "host", "gpus"]


def _gpu_labels(gpu: Gpu) -> list[str]:
    index = "" if gpu.index is None else str(gpu.index)
    return [index, gpu.uuid, f"nvidia{index}", gpu.name, gpu.host.name]


class ControllerCollector:
    """Reads the latest values copied onto the Gpu and GpuInstance rows, and the open alerts."""

    def collect(self):
        gpus = list(Gpu.objects.select_related("host").exclude(index=None))
        yield from self._gpu_families(gpus)
        yield from self._process_families(gpus)
        yield from self._claim_families(gpus)
        yield from self._instance_families()
        yield from self._alert_families()
        yield from self._host_families()

    def _host_families(self):
        up = GaugeMetricFamily(
            "llamacontroller_host_up",
            "1 while the host's worker sends heartbeats, 0 once it is down (LLAMACONTROLLER_HOST_TIMEOUT_SECONDS).",
            labels=["host"],
        )
        seen = GaugeMetricFamily(
            "llamacontroller_host_last_heartbeat_seconds",
            "Unix time of the host worker's last heartbeat.",
            labels=["host"],
        )
        for host in Host.objects.all():
            up.add_metric([host.name], 1 if host.is_up else 0)
            if host.last_seen is not None:
                seen.add_metric([host.name], host.last_seen.timestamp())
        yield from (up, seen)

    def _gpu_families(self, gpus):
        used = GaugeMetricFamily(
            "DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB).", labels=GPU_LABELS
        )
        free = GaugeMetricFamily(
            "DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB).", labels=GPU_LABELS
        )
        total = GaugeMetricFamily(
            "DCGM_FI_DEV_FB_TOTAL", "Framebuffer memory total (in MiB).", labels=GPU_LABELS
        )
        util = GaugeMetricFamily("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %).", labels=GPU_LABELS)
        state = GaugeMetricFamily(
            "llamacontroller_gpu_state",
            "1 for the GPU's current state (idle, model_loaded, occupied_by_others, unavailable).",
            labels=GPU_LABELS + ["state"],
        )
        simulated = GaugeMetricFamily(
            "llamacontroller_gpu_simulated", "1 for a simulated GPU (fake backend).", labels=GPU_LABELS
        )
        for gpu in gpus:
            labels = _gpu_labels(gpu)
            total.add_metric(labels, gpu.memory_total_mib)
            if gpu.memory_used_mib is not None and gpu.state != Gpu.State.UNAVAILABLE:
                used.add_metric(labels, gpu.memory_used_mib)
                free.add_metric(labels, max(0, gpu.memory_total_mib - gpu.memory_used_mib))
            if gpu.utilization_pct is not None and gpu.state != Gpu.State.UNAVAILABLE:
                util.add_metric(labels, gpu.utilization_pct)
            for choice in Gpu.State.values:
                state.add_metric(labels + [choice], 1 if gpu.state == choice else 0)
            simulated.add_metric(labels, 1 if gpu.simulated else 0)
        yield from (used, free, total, util, state, simulated)

    def _process_families(self, gpus):
        family = GaugeMetricFamily(
            "llamacontroller_gpu_process_memory_used_bytes",
            "GPU memory of each process on a GPU; owner is instance (ours), foreign or orphan.",
            labels=GPU_LABELS + ["pid", "process_name", "owner", "instance_id"],
        )
        for gpu in gpus:
            if gpu.state == Gpu.State.UNAVAILABLE:
                continue
            for proc in gpu.processes or []:
                if proc.get("used_mib") is None:
                    continue
                family.add_metric(
                    _gpu_labels(gpu)
                    + [
                        str(proc.get("pid")),
                        proc.get("name") or "",
                        proc.get("owner") or "",
                        "" if proc.get("instance_id") is None else str(proc["instance_id"]),
                    ],  # fmt: skip
                    proc["used_mib"] * MIB,
                )
        yield family

    def _claim_families(self, gpus):
        """Admission's view of each GPU (models_app/claims.py): what the instances claim, and what is left."""
        claimed = GaugeMetricFamily(
            "llamacontroller_gpu_claimed_bytes",
            "GPU memory the active instances claim (estimate or measured, plus headroom).",
            labels=GPU_LABELS,
        )
        unclaimed = GaugeMetricFamily(
            "llamacontroller_gpu_unclaimed_bytes",
            "GPU memory left for a new claim: total less foreign memory and the claims (0 when over).",
            labels=GPU_LABELS,
        )
        per_instance = GaugeMetricFamily(
            "llamacontroller_gpu_instance_claim_bytes",
            "One instance's claim on one GPU.",
            labels=GPU_LABELS + ["instance_id", "model"],
        )
        state = admission.gpu_claims(gpus)
        for gpu in gpus:
            here = state[gpu.pk]
            claimed.add_metric(_gpu_labels(gpu), here.claimed_mib * MIB)
            if here.memory_known:
                unclaimed.add_metric(_gpu_labels(gpu), max(0, here.free_mib) * MIB)
            for holder in here.holders:
                labels = _gpu_labels(gpu) + [str(holder.instance_id), holder.model_id]
                per_instance.add_metric(labels, here.claim_of(holder) * MIB)
        yield from (claimed, unclaimed, per_instance)

    def _instance_families(self):
        instances = list(
            GpuInstance.objects.filter(status__in=GpuInstance.ACTIVE_STATUSES)
            .select_related("model", "host")
            .prefetch_related(Prefetch("gpu_links", queryset=InstanceGpu.objects.select_related("gpu")))
        )
        used = GaugeMetricFamily(
            "llamacontroller_instance_memory_used_bytes",
            "GPU memory a model instance's own processes use, over all its GPUs.",
            labels=INSTANCE_LABELS + ["source"],
        )
        total = GaugeMetricFamily(
            "llamacontroller_instance_memory_total_bytes",
            "Total memory of the GPUs the instance runs on.",
            labels=INSTANCE_LABELS,
        )
        per_gpu = GaugeMetricFamily(
            "llamacontroller_instance_gpu_memory_used_bytes",
            "GPU memory of an instance's processes on one of its GPUs.",
            labels=INSTANCE_LABELS + ["gpu", "UUID"],
        )
        estimate = GaugeMetricFamily(
            "llamacontroller_instance_memory_estimate_bytes",
            "The memory predicted when the load was asked for (weights, KV cache, compute, CUDA context).",
            labels=INSTANCE_LABELS,
        )
        status = GaugeMetricFamily(
            "llamacontroller_instance_status",
            "1 for the instance's current status (pending, starting, running, stopping, unknown).",
            labels=INSTANCE_LABELS + ["status"],
        )
        for instance in instances:
            labels = [str(instance.pk), instance.model_id, instance.host.name, instance.gpu_ids]
            if (
                instance.memory_source != GpuInstance.MemorySource.NONE
                and instance.memory_used_mb is not None
            ):
                used.add_metric(labels + [instance.memory_source], instance.memory_used_mb * MIB)
            if instance.memory_total_mb:
                total.add_metric(labels, instance.memory_total_mb * MIB)
            if instance.memory_estimated_mb:
                estimate.add_metric(labels, instance.memory_estimated_mb * MIB)
            for link in instance.gpu_links.all():
                mine = [
                    p.get("used_mib") or 0
                    for p in link.gpu.processes or []
                    if p.get("instance_id") == instance.pk
                ]
                if mine:
                    per_gpu.add_metric(labels + [str(link.gpu.index), link.gpu.uuid], sum(mine) * MIB)
            for choice in GpuInstance.ACTIVE_STATUSES:
                status.add_metric(labels + [choice], 1 if instance.status == choice else 0)
        counts = GaugeMetricFamily(
            "llamacontroller_instances",
            "Instances by status (every status, ended ones included).",
            labels=["status"],
        )
        by_status = dict(
            GpuInstance.objects.order_by()
            .values_list("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        for choice in GpuInstance.Status.values:
            counts.add_metric([choice], by_status.get(choice, 0))
        yield from (used, total, estimate, per_gpu, status, counts)

    def _alert_families(self):
        family = GaugeMetricFamily(
            "llamacontroller_alerts_open", "Open alerts by rule.", labels=["rule", "kind", "severity"]
        )
        open_by_rule = dict(
            Alert.objects.filter(status=Alert.Status.OPEN)
            .order_by()
            .values_list("rule_id")
            .annotate(n=Count("id"))
            .values_list("rule_id", "n")
        )
        for rule in AlertRule.objects.all():
            family.add_metric([rule.name, rule.kind, rule.severity], open_by_rule.get(rule.pk, 0))
        yield family


def _allowed_address(request) -> bool:
    address = client_ip(request)
    if not address or not settings.METRICS_ALLOWED_ADDRESSES:
        return False
    try:
        ip = ipaddress.ip_address(address)
        return any(
            ip in ipaddress.ip_network(net, strict=False) for net in settings.METRICS_ALLOWED_ADDRESSES
        )
    except ValueError:
        return False


def _authorised(request) -> tuple[bool, int]:
    if _allowed_address(request):
        return True, 200
    if request.user.is_authenticated:  # a logged-in session
        return roles.can_read(request.user), 403
    try:
        found = BearerTokenAuthentication().authenticate(request)
    except AuthenticationFailed:
        return False, 401
    if found is None:
        return False, 401
    return roles.can_read(found[0]), 403


def metrics_view(request):
    """GET /metrics: the Prometheus text format."""
    ok, status = _authorised(request)
    if not ok:
        response = HttpResponse(
            "401 Unauthorized: send an API token (Authorization: Bearer lc_…)\n"
            if status == 401
            else "403 Forbidden: the token's user has no role\n",
            status=status,
            content_type="text/plain",
        )
        if status == 401:
            response["WWW-Authenticate"] = "Bearer"
        return response
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ControllerCollector())
    return HttpResponse(generate_latest(registry), content_type=CONTENT_TYPE_LATEST)
