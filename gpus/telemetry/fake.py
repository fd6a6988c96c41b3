"""Fake backend for machines without GPUs: simulated GPUs described by a JSON file, used by REAL
processes that select them through CUDA_VISIBLE_DEVICES (uuid or index).

The file is re-read on every sample() so tests can edit it to inject faults at run time.

Utilisation, temperature and power are given per GPU in the file, or left out ("—" on the dashboard). With
`"simulate_load": true` a GPU without them gets plausible ones from the real processes on it: utilisation is
their CPU use since the previous sample (a llama-server generating on the CPU keeps a core or more busy: 100 %),
temperature rises from 30 °C idle to 80 °C at full use, and power from 25 W to the board's `power_limit_w`
(450 W, an RTX 4090's, unless the file says).
"""

from __future__ import annotations

import json
import time
from typing import Any

import psutil

from .base import GpuProcess, GpuReading, TelemetryError
from .procs import MIB, cuda_visible_devices_by_pid

IDLE_C, FULL_C, IDLE_W, POWER_LIMIT_W = 30, 80, 25, 450


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class FakeBackend:
    name = "fake"

    def __init__(self, path: str, proc_root: str = "/proc") -> None:
        self.path = str(path)
        self._proc_root = proc_root
        self._cpu: dict[tuple[int, float], float] = {}  # (pid, start time) -> CPU seconds at the last sample
        self._sampled_at: float | None = None  # monotonic time of the last sample
        self.load()  # fail at construction on a bad file, like the real backends do on init

    def load(self) -> dict[str, Any]:
        try:
            with open(self.path, encoding="utf-8") as f:
                data = json.load(f)
        except FileNotFoundError as err:
            raise TelemetryError(f"fake GPUs file {self.path}: not found") from err
        except OSError as err:
            raise TelemetryError(f"fake GPUs file {self.path}: cannot read: {err}") from err
        except ValueError as err:
            raise TelemetryError(f"fake GPUs file {self.path}: invalid JSON: {err}") from err
        self._validate(data)
        return data

    def _problem(self, message: str) -> TelemetryError:
        return TelemetryError(f"fake GPUs file {self.path}: {message}")

    def _validate(self, data: Any) -> None:
        if not isinstance(data, dict) or not isinstance(data.get("gpus"), list):
            raise self._problem('top level must be an object with a "gpus" list')
        if data.get("fail") is not None and not isinstance(data["fail"], str):
            raise self._problem('"fail" must be null or a string')
        hang = data.get("hang_seconds", 0)
        if hang is not None and (not isinstance(hang, int | float) or isinstance(hang, bool) or hang < 0):
            raise self._problem('"hang_seconds" must be a number >= 0')
        for i, gpu in enumerate(data["gpus"]):
            where = f"gpus[{i}]"
            if not isinstance(gpu, dict):
                raise self._problem(f"{where} must be an object")
            for key in ("index", "memory_total_mib"):
                if not _is_int(gpu.get(key)) or gpu[key] < 0:
                    raise self._problem(f"{where}.{key} must be an integer >= 0")
            for key in ("uuid", "name"):
                if not isinstance(gpu.get(key), str) or not gpu[key]:
                    raise self._problem(f"{where}.{key} must be a non-empty string")
            if not _is_int(gpu.get("baseline_used_mib", 0)) or gpu.get("baseline_used_mib", 0) < 0:
                raise self._problem(f"{where}.baseline_used_mib must be an integer >= 0")
            for key in ("utilization_pct", "temperature_c", "power_w", "power_limit_w"):  # optional
                if gpu.get(key) is not None and (not _is_int(gpu[key]) or gpu[key] < 0):
                    raise self._problem(f"{where}.{key} must be an integer >= 0")
            if not isinstance(gpu.get("simulate_load", False), bool):
                raise self._problem(f"{where}.simulate_load must be true or false")
            foreign = gpu.get("foreign_processes", [])
            if not isinstance(foreign, list):
                raise self._problem(f"{where}.foreign_processes must be a list")
            for j, proc in enumerate(foreign):
                pwhere = f"{where}.foreign_processes[{j}]"
                if not isinstance(proc, dict):
                    raise self._problem(f"{pwhere} must be an object")
                if proc.get("pid") is not None and not _is_int(proc["pid"]):
                    raise self._problem(f"{pwhere}.pid must be an integer or null")
                if not isinstance(proc.get("name", ""), str):
                    raise self._problem(f"{pwhere}.name must be a string")
                used = proc.get("used_mib")
                if used is not None and (not _is_int(used) or used < 0):
                    raise self._problem(f"{pwhere}.used_mib must be an integer >= 0 or null")

    def sample(self) -> list[GpuReading]:
        data = self.load()
        if data.get("hang_seconds"):
            time.sleep(data["hang_seconds"])
        if data.get("fail"):
            raise TelemetryError(data["fail"])

        gpus = data["gpus"]
        # token ("GPU-..." uuid or "3") -> position in gpus
        slot_by_token: dict[str, int] = {}
        for slot, gpu in enumerate(gpus):
            slot_by_token[gpu["uuid"]] = slot
            slot_by_token.setdefault(str(gpu["index"]), slot)

        ours: list[list[GpuProcess]] = [[] for _ in gpus]
        busy = [0.0 for _ in gpus]  # CPU seconds of the GPU's processes since the last sample
        cpu: dict[tuple[int, float], float] = {}
        for pid, tokens in cuda_visible_devices_by_pid(self._proc_root).items():
            slots = sorted({slot_by_token[t] for t in tokens if t in slot_by_token})
            if not slots:
                continue
            try:
                proc = psutil.Process(pid)
                with proc.oneshot():
                    rss = proc.memory_info().rss
                    name = proc.name()
                    times = proc.cpu_times()
                    key = (pid, proc.create_time())
            except (psutil.Error, OSError):  # exited since the scan, zombie, or not ours
                continue
            rss_mib = max(1, rss // MIB) if rss > 0 else 0
            share = rss_mib // len(slots)
            cpu[key] = times.user + times.system
            used_cpu = cpu[key] - self._cpu.get(key, cpu[key])  # a process new since the last sample: 0
            for slot in slots:
                ours[slot].append(GpuProcess(pid=pid, name=name, used_mib=share))
                busy[slot] += used_cpu / len(slots)
        now = time.monotonic()
        elapsed = now - self._sampled_at if self._sampled_at is not None else 0.0
        self._cpu, self._sampled_at = cpu, now

        readings = []
        for slot, gpu in enumerate(gpus):
            foreign = tuple(
                GpuProcess(pid=p.get("pid"), name=p.get("name", ""), used_mib=p.get("used_mib"))
                for p in gpu.get("foreign_processes", [])
            )
            processes = foreign + tuple(ours[slot])
            used = gpu.get("baseline_used_mib", 0) + sum(p.used_mib or 0 for p in processes)
            figures = {key: gpu.get(key) for key in ("utilization_pct", "temperature_c", "power_w")}
            if gpu.get("simulate_load"):
                figures = simulated_load(busy[slot], elapsed, gpu.get("power_limit_w"), figures)
            readings.append(
                GpuReading(
                    index=gpu["index"],
                    uuid=gpu["uuid"],
                    name=gpu["name"],
                    memory_total_mib=gpu["memory_total_mib"],
                    memory_used_mib=min(used, gpu["memory_total_mib"]),
                    processes=processes,
                    simulated=True,
                    **figures,
                )
            )
        return readings

    def close(self) -> None:
        pass


def simulated_load(cpu_seconds: float, elapsed: float, power_limit_w: int | None, given: dict) -> dict:
    """Utilisation, temperature and power of a simulated GPU whose processes used `cpu_seconds` of CPU in
    the `elapsed` seconds since the previous sample; figures the file gives win."""
    utilization = given["utilization_pct"]
    if utilization is None:
        utilization = min(100, round(cpu_seconds * 100 / elapsed)) if elapsed > 0 else 0
    limit = POWER_LIMIT_W if power_limit_w is None else power_limit_w
    temperature, power = given["temperature_c"], given["power_w"]
    return {
        "utilization_pct": utilization,
        "temperature_c": round(IDLE_C + (FULL_C - IDLE_C) * utilization / 100)
        if temperature is None
        else temperature,
        "power_w": round(min(IDLE_W, limit) + max(0, limit - IDLE_W) * utilization / 100)
        if power is None
        else power,
    }
