"""Plain-Python GPU telemetry (NVML, nvidia-smi, or simulated GPUs). Must not import Django: it
runs on GPU machines as ``python3 -m gpus.telemetry`` with only nvidia-ml-py and psutil."""

from .base import (
    GpuProcess,
    GpuReading,
    NoGpuBackend,
    TelemetryBackend,
    TelemetryError,
    get_backend,
    sample_with_timeout,
)
from .procs import process_tree_pids, process_trees

__all__ = [
    "GpuProcess",
    "GpuReading",
    "NoGpuBackend",
    "TelemetryBackend",
    "TelemetryError",
    "get_backend",
    "process_tree_pids",
    "process_trees",
    "sample_with_timeout",
]
