"""NVML backend (nvidia-ml-py, module ``pynvml``)."""

from __future__ import annotations

import threading
from typing import Any

from .base import GpuProcess, GpuReading, TelemetryError
from .procs import MIB, nspid_map, process_name

# pynvml turns the driver's "not available" figure into None, but older/other bindings pass the raw
# unsigned long long through; accept both.
_NOT_AVAILABLE_DEFAULT = 2**64 - 1
_NVML_ERROR_NOT_SUPPORTED = 3

# nvmlInit is process-wide state: initialise each module once (keyed by id so tests can inject
# stand-ins) and never shut down while other backends in the process might still use it.
_init_lock = threading.Lock()
_initialised: set[int] = set()


def _ensure_init(nvml: Any) -> None:
    with _init_lock:
        if id(nvml) in _initialised:
            return
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as err:
            raise TelemetryError(str(err)) from err
        except Exception as err:  # e.g. OSError from a broken install; "auto" must be able to move on
            raise TelemetryError(f"NVML init failed: {type(err).__name__}: {err}") from err
        _initialised.add(id(nvml))


class NvmlBackend:
    name = "nvml"

    def __init__(self, nvml_module: Any = None, proc_root: str = "/proc") -> None:
        if nvml_module is None:
            try:
                import pynvml as nvml_module
            except ImportError as err:
                raise TelemetryError(f"nvidia-ml-py (pynvml) is not installed: {err}") from err
        self._nvml = nvml_module
        self._proc_root = proc_root
        self._not_available = {
            getattr(nvml_module, "NVML_VALUE_NOT_AVAILABLE", _NOT_AVAILABLE_DEFAULT),
            _NOT_AVAILABLE_DEFAULT,
        }
        self._handles: list[Any] = []
        _ensure_init(nvml_module)

    def sample(self) -> list[GpuReading]:
        nvml = self._nvml
        try:
            count = nvml.nvmlDeviceGetCount()
            if count != len(self._handles):
                self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            raw = [self._read_gpu(index, handle) for index, handle in enumerate(self._handles)]
        except nvml.NVMLError as err:
            raise TelemetryError(str(err)) from err

        # Only pay for the /proc scan when some GPU reports processes.
        pid_map = nspid_map(self._proc_root) if any(procs for _, procs in raw) else {}
        readings = []
        for fields, procs in raw:
            processes = []
            for pid, used_mib in procs:
                local_pid = pid_map.get(pid, pid)
                processes.append(GpuProcess(pid=local_pid, name=process_name(local_pid), used_mib=used_mib))
            readings.append(GpuReading(**fields, processes=tuple(processes)))
        return readings

    def _read_gpu(self, index: int, handle: Any) -> tuple[dict[str, Any], list[tuple[int, int | None]]]:
        nvml = self._nvml
        memory = nvml.nvmlDeviceGetMemoryInfo(handle)
        try:
            utilization: int | None = int(nvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except nvml.NVMLError:  # MIG-enabled GPUs answer NOT_SUPPORTED
            utilization = None
        try:
            temperature: int | None = int(nvml.nvmlDeviceGetTemperature(handle, nvml.NVML_TEMPERATURE_GPU))
        except Exception:  # NVMLError where the sensor is not exposed (vGPU, some boards), old bindings
            temperature = None
        try:
            power: int | None = round(nvml.nvmlDeviceGetPowerUsage(handle) / 1000)  # milliwatts
        except Exception:  # NOT_SUPPORTED on some boards and under MIG
            power = None
        try:
            mig = bool(nvml.nvmlDeviceGetMigMode(handle)[0])
        except Exception:  # NVMLError on pre-Ampere GPUs/old drivers, AttributeError on old bindings
            mig = False
        fields = {
            "index": index,
            "uuid": _text(nvml.nvmlDeviceGetUUID(handle)),
            "name": _text(nvml.nvmlDeviceGetName(handle)),
            "memory_total_mib": int(memory.total) // MIB,
            "memory_used_mib": int(memory.used) // MIB,
            "utilization_pct": utilization,
            "mig": mig,
            "temperature_c": temperature,
            "power_w": power,
        }
        return fields, self._processes(handle)

    def _processes(self, handle: Any) -> list[tuple[int, int | None]]:
        """Compute and graphics processes, one entry per pid, keeping the larger memory figure."""
        used_by_pid: dict[int, int | None] = {}
        nvml = self._nvml
        for query in (nvml.nvmlDeviceGetComputeRunningProcesses, nvml.nvmlDeviceGetGraphicsRunningProcesses):
            try:
                entries = query(handle)
            except nvml.NVMLError as err:
                if getattr(err, "value", None) == _NVML_ERROR_NOT_SUPPORTED:
                    continue  # some GPUs/modes do not list graphics processes
                raise
            for entry in entries:
                used = entry.usedGpuMemory
                used_mib = None if used is None or used in self._not_available else int(used) // MIB
                pid = int(entry.pid)
                if pid not in used_by_pid or (used_mib or -1) > (used_by_pid[pid] or -1):
                    used_by_pid[pid] = used_mib
        return list(used_by_pid.items())

    def close(self) -> None:
        self._handles = []


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
