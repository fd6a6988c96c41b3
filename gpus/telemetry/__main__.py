"""CLI: python -m gpus.telemetry --backend {auto,nvml,nvidia-smi,fake} [--json] [--repeat N]
[--fake-gpus PATH] [--timeout S]

The --json output is parsed by a shared script: keep its keys exactly as they are.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

from .base import GpuReading, TelemetryError, get_backend, sample_with_timeout


def reading_to_dict(gpu: GpuReading) -> dict:
    return {
        "index": gpu.index,
        "uuid": gpu.uuid,
        "name": gpu.name,
        "memory_total_mib": gpu.memory_total_mib,
        "memory_used_mib": gpu.memory_used_mib,
        "utilization_pct": gpu.utilization_pct,
        "temperature_c": gpu.temperature_c,
        "power_w": gpu.power_w,
        "processes": [{"pid": p.pid, "name": p.name, "used_mib": p.used_mib} for p in gpu.processes],
    }


def format_table(backend_name: str, sample_ms: float, gpus: list[GpuReading]) -> str:
    lines = [f"backend: {backend_name}   sample: {sample_ms:.3f} ms   gpus: {len(gpus)}"]
    for gpu in gpus:
        util = "n/a" if gpu.utilization_pct is None else f"{gpu.utilization_pct}%"
        util += "" if gpu.temperature_c is None else f"  {gpu.temperature_c} °C"
        util += "" if gpu.power_w is None else f"  {gpu.power_w} W"
        flags = "".join([" [simulated]" if gpu.simulated else "", " [MIG]" if gpu.mig else ""])
        lines.append(
            f"GPU {gpu.index}  {gpu.name}  {gpu.memory_used_mib}/{gpu.memory_total_mib} MiB  "
            f"util {util}{flags}"
        )
        for proc in gpu.processes:
            used = "?" if proc.used_mib is None else str(proc.used_mib)
            pid = "?" if proc.pid is None else str(proc.pid)
            lines.append(f"    pid {pid:>8}  {used:>7} MiB  {proc.name}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gpus.telemetry", description="Sample GPU telemetry.")
    parser.add_argument("--backend", choices=["auto", "nvml", "nvidia-smi", "fake"], default="auto")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument("--repeat", type=int, default=1, help="sample N times, report the median time")
    parser.add_argument(
        "--fake-gpus",
        default=os.environ.get("LLAMACONTROLLER_FAKE_GPUS"),
        help="fake GPUs JSON file (default: $LLAMACONTROLLER_FAKE_GPUS)",
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds allowed per sample")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")

    try:
        backend = get_backend(args.backend, fake_gpus_path=args.fake_gpus)
        try:
            timings = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                gpus = sample_with_timeout(backend, args.timeout)
                timings.append((time.perf_counter() - start) * 1000)
        finally:
            backend.close()
    except TelemetryError as err:
        print(f"GPU telemetry failed ({args.backend}): {err}", file=sys.stderr)
        return 2

    sample_ms = round(statistics.median(timings), 3)
    if args.json:
        out = {"backend": backend.name, "sample_ms": sample_ms, "gpus": [reading_to_dict(g) for g in gpus]}
        print(json.dumps(out))
    else:
        print(format_table(backend.name, sample_ms, gpus))
    return 0


if __name__ == "__main__":
    sys.exit(main())
