"""nvidia-smi backend: for machines where NVML cannot be loaded from Python but the binary works."""

from __future__ import annotations

import os
import shutil
import subprocess

from .base import GpuProcess, GpuReading, TelemetryError
from .procs import nspid_map, process_name

GPU_QUERY = [
    "--query-gpu=index,uuid,name,memory.total,memory.used,utilization.gpu,temperature.gpu,power.draw",
    "--format=csv,noheader,nounits",
]
APPS_QUERY = [
    "--query-compute-apps=pid,gpu_uuid,used_memory,process_name",
    "--format=csv,noheader,nounits",
]

_MISSING = {"", "n/a", "[n/a]", "[not supported]", "not supported", "[unknown error]"}


def _optional_int(value: str) -> int | None:
    value = value.strip()
    if value.lower() in _MISSING:
        return None
    try:
        return round(float(value))  # power.draw has decimals ("312.45"): the nearest watt, as from NVML
    except ValueError:
        return None


def parse_gpus(output: str) -> list[dict]:
    """Parse --query-gpu output. nvidia-smi does not quote fields, so a comma inside the GPU name
    would shift columns: take the fixed columns from both ends and join the rest back as the name.

    memory.total / memory.used that are not available are reported as 0 (the GPU still shows up;
    callers treat a total of 0 as "unknown"); utilization, temperature and power as None ("[N/A]",
    "[Not Supported]": many boards do not report their power draw).
    """
    gpus = []
    for line in output.splitlines():
        if not line.strip():
            continue
        parts = [p.strip() for p in line.split(",")]
        if len(parts) < 8:
            raise TelemetryError(f"unexpected nvidia-smi --query-gpu line: {line!r}")
        index, uuid, *name_parts, total, used, util, temperature, power = parts
        index_value = _optional_int(index)
        if index_value is None:
            raise TelemetryError(f"unexpected nvidia-smi --query-gpu line: {line!r}")
        gpus.append(
            {
                "index": index_value,
                "uuid": uuid,
                "name": ", ".join(name_parts),
                "memory_total_mib": _optional_int(total) or 0,
                "memory_used_mib": _optional_int(used) or 0,
                "utilization_pct": _optional_int(util),
                "temperature_c": _optional_int(temperature),
                "power_w": _optional_int(power),
            }
        )
    return gpus


def parse_apps(output: str) -> list[tuple[int | None, str, int | None, str]]:
    """Parse --query-compute-apps output into (pid, gpu_uuid, used_mib, process_name).

    process_name is the last column and may contain commas, hence maxsplit.
    """
    apps = []
    for line in output.splitlines():
        if not line.strip() or line.strip().lower().startswith("no running"):
            continue
        parts = [p.strip() for p in line.split(",", 3)]
        if len(parts) < 3:
            raise TelemetryError(f"unexpected nvidia-smi --query-compute-apps line: {line!r}")
        pid, gpu_uuid, used = parts[:3]
        name = parts[3] if len(parts) > 3 else ""
        apps.append((_optional_int(pid), gpu_uuid, _optional_int(used), name))
    return apps


class NvidiaSmiBackend:
    name = "nvidia-smi"

    def __init__(self, binary: str | None = None, timeout: float = 5.0, proc_root: str = "/proc") -> None:
        self._binary = binary
        self._timeout = timeout
        self._proc_root = proc_root

    def _run(self, args: list[str]) -> str:
        # Looked up at sample time so a changed PATH (tests, driver installs) takes effect.
        if self._binary:
            binary = self._binary
            if not os.path.exists(binary):
                raise TelemetryError(f"nvidia-smi not found: {binary}")
        else:
            binary = shutil.which("nvidia-smi")
            if binary is None:
                raise TelemetryError("nvidia-smi not found on PATH")
        try:
            proc = subprocess.run(
                [binary, *args],
                capture_output=True,
                text=True,
                errors="replace",
                timeout=self._timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as err:
            raise TelemetryError(f"nvidia-smi timed out after {self._timeout:g}s") from err
        except OSError as err:
            raise TelemetryError(f"nvidia-smi could not be run: {err}") from err
        if proc.returncode != 0:
            text = "\n".join(t for t in (proc.stdout.strip(), proc.stderr.strip()) if t)
            raise TelemetryError(f"nvidia-smi failed (exit {proc.returncode}): {text or 'no output'}")
        return proc.stdout

    def sample(self) -> list[GpuReading]:
        gpus = parse_gpus(self._run(GPU_QUERY))
        apps = parse_apps(self._run(APPS_QUERY)) if gpus else []
        pid_map = nspid_map(self._proc_root) if apps else {}

        by_uuid: dict[str, list[GpuProcess]] = {gpu["uuid"]: [] for gpu in gpus}
        for pid, gpu_uuid, used_mib, name in apps:
            if gpu_uuid not in by_uuid:
                continue
            local_pid = pid_map.get(pid, pid) if pid is not None else None
            if not name and local_pid is not None:
                name = process_name(local_pid)
            by_uuid[gpu_uuid].append(GpuProcess(pid=local_pid, name=name, used_mib=used_mib))
        # This query has no MIG column (the command line is fixed), so mig stays False here.
        return [GpuReading(**gpu, processes=tuple(by_uuid[gpu["uuid"]])) for gpu in gpus]

    def close(self) -> None:
        pass
