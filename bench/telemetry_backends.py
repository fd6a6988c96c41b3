"""Median sample time per telemetry backend.

    .venv/bin/python bench/telemetry_backends.py [--samples N]

The fake backend is measured with 1, 8 and 64 simulated GPUs and a few real child processes on them
(it scans every process's environment each sample, so the process count of the machine matters
more than the GPU count). nvml and nvidia-smi are measured when they work on this machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from gpus.telemetry import TelemetryError, get_backend  # noqa: E402


def fake_config(n: int) -> dict:
    return {
        "gpus": [
            {
                "index": i,
                "uuid": f"GPU-{i:08d}-fake-0000-0000-000000000000",
                "name": "Simulated GPU",
                "memory_total_mib": 24564,
                "baseline_used_mib": 250,
                "foreign_processes": [{"pid": 4000 + i, "name": "foreign.py", "used_mib": 1000}],
            }
            for i in range(n)
        ]
    }


def median_ms(backend, samples: int) -> tuple[float, int]:
    backend.sample()  # warm-up: imports, caches, handles
    times = []
    for _ in range(samples):
        start = time.perf_counter()
        gpus = backend.sample()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times), len(gpus)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--samples", type=int, default=50)
    args = parser.parse_args()

    rows: list[tuple[str, str, str]] = []
    children = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            # Four real processes on fake GPUs 0..3 (by index), like llama-servers would be.
            for i in range(4):
                env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(i)}
                children.append(
                    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], env=env)
                )
            for n in (1, 8, 64):
                path = os.path.join(tmp, f"gpus-{n}.json")
                with open(path, "w") as f:
                    json.dump(fake_config(n), f)
                ms, count = median_ms(get_backend("fake", fake_gpus_path=path), args.samples)
                rows.append((f"fake ({n} GPUs)", f"{ms:.3f}", f"{count} GPUs"))
        finally:
            for child in children:
                child.kill()
                child.wait()

    for name in ("nvml", "nvidia-smi"):
        try:
            backend = get_backend(name)
            ms, count = median_ms(backend, min(args.samples, 20))
            rows.append((name, f"{ms:.3f}", f"{count} GPUs"))
        except TelemetryError as err:
            rows.append((name, "-", f"unavailable: {err}"))

    try:
        procs = len([p for p in os.listdir("/proc") if p.isdigit()])
    except OSError:
        procs = -1
    print(f"telemetry sample time, median of {args.samples} ({procs} processes on this machine)")
    print(f"{'backend':<18} {'median ms':>10}  note")
    for name, ms, note in rows:
        print(f"{name:<18} {ms:>10}  {note}")


if __name__ == "__main__":
    main()
