"""Orphans: llama-server processes on a host that no active instance owns (tagged for an instance that ended,
or running on our GPUs outside every instance's process tree). Found by each reconcile pass, killed only on an
admin's request, after checking all of it again."""

import logging

import psutil

from gpus.models import Gpu, Host
from gpus.services import executable_of, why_not_orphan
from gpus.telemetry import process_trees
from gpus.telemetry.procs import cuda_visible_devices_by_pid

from .binaries import known_paths
from .events import record
from .launch import log_prefix
from .models import GpuInstance, InstanceEvent
from .processes import create_time_of, is_alive, is_llama_server, tagged_processes
from .stop import refresh_memory, stop_pid

logger = logging.getLogger(__name__)

Kind = InstanceEvent.Kind


def owned_pids(host) -> set[int]:
    """Every pid in the process trees of the host's active instances (one scan of the process table)."""

    rows = GpuInstance.objects.filter(
        host=host, status__in=GpuInstance.ACTIVE_STATUSES, pid__isnull=False
    ).values_list("pid", "process_create_time")
    live = [pid for pid, create_time in rows if is_alive(pid, create_time)]
    return set().union(*process_trees(live).values())


def kill_orphan(host, pid: int, actor=None, gpu_id: int | None = None) -> str:
    """Kill an orphan llama-server (its process group) after checking all of it again, right before the
    kill: the GPU's telemetry, read afresh, lists the pid as an orphan (on GPU `gpu_id`; any of the host's
    when None), its executable is one of the host's llama-server binaries, no active instance owns it, and
    the pid is still the process first looked at (its create time). Returns what was done; writes an
    ORPHAN_KILLED event when it killed."""
    try:
        proc = psutil.Process(pid)
        create_time = proc.create_time()
    except psutil.Error:
        return f"pid {pid} is not running on {host.name}"
    refresh_memory(host.name)  # the telemetry as of now
    gpus = Gpu.objects.filter(host=host).select_related("host")
    reasons = [why_not_orphan(gpu, pid) for gpu in (gpus.filter(pk=gpu_id) if gpu_id else gpus)]
    if None not in reasons:
        why = reasons[0][1] if reasons else f"no such GPU on {host.name}"
        return f"pid {pid} left alone: {why}"
    if executable_of(pid) not in known_paths(host.name):
        return f"pid {pid} on {host.name} is not running one of the host's llama-server binaries: left alone"
    if pid in owned_pids(host):
        return f"pid {pid} on {host.name} belongs to an active instance: unload it instead"
    if create_time_of(pid) != create_time:
        return f"pid {pid} on {host.name} is another process since it was checked: left alone"
    try:
        described = " ".join(proc.cmdline())[:300]
    except psutil.Error:
        described = "llama-server"
    problem = stop_pid(pid, create_time)
    message = f"killed orphan pid {pid} on {host.name}: {described}"
    if problem:
        message = f"{problem} on {host.name}: {described}"
    record(Kind.ORPHAN_KILLED, actor=actor, detail=message)
    refresh_memory(host.name)
    return message


def find_orphans(host: Host) -> list[dict]:
    """llama-server processes that no active instance of the host owns: tagged for one of our inactive or
    unknown instances, or running on our GPUs outside every instance's process tree."""
    owned = owned_pids(host)
    gpu_index = dict(host.gpus.values_list("uuid", "index"))
    our_logs = log_prefix(host.name)
    tagged = tagged_processes()
    orphans = []
    for pid, (instance_id, log) in tagged.items():
        if log.startswith(our_logs) and pid not in owned:
            orphans.append(
                {"pid": pid, "instance_id": instance_id, "reason": "tagged for an inactive instance"}
            )
    for pid, tokens in cuda_visible_devices_by_pid().items():
        on_ours = sorted(gpu_index[t] for t in tokens if t in gpu_index)
        if not on_ours or pid in owned or pid in tagged:
            continue
        try:
            proc = psutil.Process(pid)
        except psutil.Error:
            continue
        if is_llama_server(proc):
            orphans.append(
                {"pid": pid, "instance_id": None, "gpus": on_ours, "reason": "on our GPUs, unowned"}
            )
    return orphans
