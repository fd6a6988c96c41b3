"""Core types and the backend factory. Plain Python: no Django import anywhere in this package."""

from __future__ import annotations

import shutil
import threading
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class GpuProcess:
    pid: int | None  # pid in OUR pid namespace when it can be mapped, else as reported
    name: str
    used_mib: int | None  # None when the driver does not say


@dataclass(frozen=True)
class GpuReading:
    index: int
    uuid: str
    name: str
    memory_total_mib: int
    memory_used_mib: int
    utilization_pct: int | None
    processes: tuple[GpuProcess, ...]
    simulated: bool = False
    mig: bool = False  # MIG mode enabled (reported, never crashes)
    temperature_c: int | None = None  # where the backend gives it (NVML; the fake file may)
    power_w: int | None = None  # the board's power draw, watts


class TelemetryError(Exception):
    """The one exception type; the message carries the driver/NVML/nvidia-smi text."""


class TelemetryBackend(Protocol):
    name: str  # "nvml" | "nvidia-smi" | "fake" | "none"

    def sample(self) -> list[GpuReading]: ...

    def close(self) -> None: ...


class NoGpuBackend:
    """Used by "auto" when neither NVML nor nvidia-smi works: a machine with no GPUs."""

    name = "none"

    def sample(self) -> list[GpuReading]:
        return []

    def close(self) -> None:
        pass


def sample_with_timeout(backend: TelemetryBackend, timeout: float) -> list[GpuReading]:
    """Run backend.sample() in a daemon thread so a hung driver call cannot block the caller.

    A hung thread is abandoned (daemon, so it does not keep the process alive).
    """
    result: list[list[GpuReading]] = []
    error: list[BaseException] = []

    def run() -> None:
        try:
            result.append(backend.sample())
        except BaseException as exc:  # noqa: BLE001 - everything is reported as TelemetryError
            error.append(exc)

    thread = threading.Thread(target=run, name=f"gpu-telemetry-{backend.name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TelemetryError(f"GPU query timed out after {timeout}s")
    if error:
        exc = error[0]
        if isinstance(exc, TelemetryError):
            raise exc
        raise TelemetryError(f"{type(exc).__name__}: {exc}") from exc
    if not result:
        raise TelemetryError("GPU query failed without a result")
    return result[0]


def get_backend(
    name: str = "auto", *, fake_gpus_path: str | None = None, smi_timeout: float = 5.0
) -> TelemetryBackend:
    """Return a started backend.

    "auto": NVML if it initialises, else nvidia-smi if the binary exists and runs, else NoGpuBackend.
    A named backend that cannot start raises TelemetryError with the reason.
    """
    # Imported here: the backend modules import this one.
    from .fake import FakeBackend
    from .nvidia_smi import NvidiaSmiBackend
    from .nvml import NvmlBackend

    if name == "nvml":
        return NvmlBackend()
    if name == "nvidia-smi":
        if shutil.which("nvidia-smi") is None:
            raise TelemetryError("nvidia-smi not found on PATH")
        return NvidiaSmiBackend(timeout=smi_timeout)
    if name == "fake":
        if not fake_gpus_path:
            raise TelemetryError("fake backend needs a fake GPUs file (fake_gpus_path)")
        return FakeBackend(fake_gpus_path)
    if name != "auto":
        raise ValueError(f"unknown telemetry backend {name!r}")

    try:
        return NvmlBackend()
    except TelemetryError:
        pass
    if shutil.which("nvidia-smi") is not None:
        smi = NvidiaSmiBackend(timeout=smi_timeout)
        try:
            smi.sample()  # "exists and runs": a driver-less box often still ships the binary
            return smi
        except TelemetryError:
            pass
    return NoGpuBackend()
