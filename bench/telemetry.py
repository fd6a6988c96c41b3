"""Benchmark: the controller's own cost of one GPU refresh cycle (ms and database queries) for 1, 8 and 64
simulated GPUs with one running instance each, on SQLite and on PostgreSQL, beside the backend's sample.

    .venv/bin/python bench/telemetry.py                      # SQLite, and PostgreSQL if reachable
    .venv/bin/python bench/telemetry.py --databases sqlite
    .venv/bin/python bench/telemetry.py --live 2             # and the live figures (models_app/live.py)

--live SECONDS also times the live refresh a worker's thread runs between the full ones (no history sample, no
alert) and runs that thread (models_app.live.LiveRefresh) at that interval for --live-duration seconds on the
8-GPU host: the CPU it costs the worker's process (user + system, psutil) per second and per tick.

PostgreSQL: BENCH_POSTGRES_URL (default postgres://postgres@127.0.0.1:5432/postgres); the script creates and
drops its own database. Each instance is a real process placed on its fake GPU (CUDA_VISIBLE_DEVICES)."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
GPU_COUNTS = (1, 8, 64)
CYCLES = 30


def run_one_database(label: str, live_seconds: int = 0, live_duration: float = 30.0) -> list[dict]:
    """Runs inside a child process whose environment selects the database."""
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from django.core.management import call_command
    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from gpus import services
    from models_app.memory import refresh_host_memory
    from models_app.models import GpuInstance, InstanceGpu, ModelConfig

    call_command("migrate", verbosity=0)
    model = ModelConfig.objects.create(id="bench", name="Bench", path="/bench.gguf")
    results = []
    data_dir = Path(os.environ["LLAMACONTROLLER_DATA_DIR"])
    for count in GPU_COUNTS:
        uuids = [f"GPU-bench-{count:02d}-{i:04d}" for i in range(count)]
        gpus = [
            {"index": i, "uuid": u, "name": "Simulated", "memory_total_mib": 81559, "baseline_used_mib": 0}
            for i, u in enumerate(uuids)
        ]
        fake_file = data_dir / f"gpus-{count}.json"
        fake_file.write_text(json.dumps({"gpus": gpus}))
        from django.conf import settings

        settings.FAKE_GPUS_FILE = str(fake_file)
        host_name = f"bench-{count}"
        host = services.register_host(host_name)
        children = [
            subprocess.Popen(["sleep", "600"], env={"CUDA_VISIBLE_DEVICES": u, "PATH": os.environ["PATH"]})
            for u in uuids
        ]
        try:
            import psutil

            for position, gpu in enumerate(host.gpus.order_by("index")):
                child = children[position]
                instance = GpuInstance.objects.create(
                    model=model,
                    host=host,
                    gpu_ids=str(gpu.index),
                    status="running",
                    pid=child.pid,
                    process_create_time=psutil.Process(child.pid).create_time(),
                    loaded_at=timezone.now(),
                )
                InstanceGpu.objects.create(instance=instance, gpu=gpu, position=0)
            refresh_host_memory(host_name)  # warm
            sample_ms, controller_ms, queries, transaction_markers = [], [], [], []
            for _ in range(CYCLES):
                sampled = services.sample_gpus()
                started = time.perf_counter()
                with CaptureQueriesContext(connection) as captured:
                    figures = refresh_host_memory(host_name, sampled)
                controller_ms.append((time.perf_counter() - started) * 1000)
                sample_ms.append(sampled.sample_ms)
                # BEGIN/COMMIT: the transaction Django's bulk_create wraps around its INSERT.
                statements = [
                    q for q in captured.captured_queries if not q["sql"].startswith(("BEGIN", "COMMIT"))
                ]
                queries.append(len(statements))
                transaction_markers.append(len(captured) - len(statements))
            assert all(f.source == "process" for f in figures), figures[:3]
            live = measure_live(host_name, count, live_seconds, live_duration) if live_seconds else {}
        finally:
            for child in children:
                child.kill()
                child.wait()
        GpuInstance.objects.filter(host=host).update(status="stopped")
        InstanceGpu.objects.filter(instance__host=host).update(active=False)
        results.append(
            {
                "database": label,
                "gpus": count,
                "sample_ms": statistics.median(sample_ms),
                "controller_ms": statistics.median(controller_ms),
                "queries": statistics.median(queries),
                "markers": statistics.median(transaction_markers),
                **live,
            }
        )
    return results


def measure_live(host_name: str, count: int, live_seconds: int, duration: float) -> dict:
    """The live refresh: its cost per tick (median of CYCLES), and, for 8 GPUs, the thread run for `duration`
    seconds at `live_seconds`: the process's CPU time per second of wall time and per tick."""
    import psutil
    from django.conf import settings
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from gpus import services
    from gpus.models import MemorySample
    from models_app.live import LiveRefresh
    from models_app.memory import refresh_live

    sample_ms, controller_ms, queries = [], [], []
    stored = MemorySample.objects.count()
    for _ in range(CYCLES):
        sampled = services.sample_gpus()
        started = time.perf_counter()
        with CaptureQueriesContext(connection) as captured:
            refresh_live(host_name, sampled)
        controller_ms.append((time.perf_counter() - started) * 1000)
        sample_ms.append(sampled.sample_ms)
        queries.append(
            len([q for q in captured.captured_queries if not q["sql"].startswith(("BEGIN", "COMMIT"))])
        )
    assert MemorySample.objects.count() == stored  # no history
    result = {
        "live_sample_ms": statistics.median(sample_ms),
        "live_controller_ms": statistics.median(controller_ms),
        "live_queries": statistics.median(queries),
    }
    if count != 8:
        return result
    settings.GPU_LIVE_SECONDS = live_seconds
    thread = LiveRefresh(host_name)
    process = psutil.Process()
    before, started = process.cpu_times(), time.monotonic()
    thread.start()
    time.sleep(duration)
    thread.stop()
    thread.join()
    after, wall = process.cpu_times(), time.monotonic() - started
    cpu = (after.user - before.user) + (after.system - before.system)
    assert MemorySample.objects.count() == stored and thread.skipped is None, thread.skipped
    return result | {"thread_ticks": thread.ticks, "thread_cpu_s": cpu, "thread_wall_s": wall}


def child_env(database: str, data_dir: str) -> dict:
    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="llamacontroller_site.settings",
        SECRET_KEY="bench",
        LLAMACONTROLLER_DATA_DIR=data_dir,
        LLAMACONTROLLER_GPU_BACKEND="fake",
        LLAMACONTROLLER_FAKE_GPUS=str(Path(data_dir) / "none.json"),
        REDIS_URL="redis://127.0.0.1:1/0",  # not used: no tasks are sent
    )
    env.pop("DATABASE_URL", None)
    if database != "sqlite":
        env["DATABASE_URL"] = database
    return env


def postgres_database() -> str | None:
    import psycopg

    admin_url = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432/postgres")
    try:
        with psycopg.connect(admin_url, autocommit=True, connect_timeout=3) as conn:
            conn.execute("DROP DATABASE IF EXISTS lc_bench_telemetry")
            conn.execute("CREATE DATABASE lc_bench_telemetry")
    except psycopg.Error as exc:
        print(f"PostgreSQL not reachable ({exc}); skipped", file=sys.stderr)
        return None
    return admin_url.rsplit("/", 1)[0] + "/lc_bench_telemetry"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--databases", default="sqlite,postgres")
    parser.add_argument("--live", type=int, default=0, metavar="SECONDS", help="also the live figures")
    parser.add_argument("--live-duration", type=float, default=30.0)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one_database(args.child, args.live, args.live_duration)))
        return

    rows = []
    for name in args.databases.split(","):
        url = "sqlite" if name == "sqlite" else postgres_database()
        if url is None:
            continue
        with tempfile.TemporaryDirectory() as data_dir:
            out = subprocess.run(
                [sys.executable, __file__, "--child", name, "--live", str(args.live)]
                + ["--live-duration", str(args.live_duration)],
                env=child_env(url, data_dir),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        rows += json.loads(out.strip().splitlines()[-1])
    print(f"refresh cycle, median of {CYCLES}; one running instance (a real process) per simulated GPU")
    print(
        f"{'database':<10} {'GPUs':>5} {'backend sample ms':>18} {'controller ms':>14} {'queries':>8} +BEGIN/COMMIT"
    )
    for r in rows:
        print(
            f"{r['database']:<10} {r['gpus']:>5} {r['sample_ms']:>18.2f} {r['controller_ms']:>14.2f} "
            f"{r['queries']:>8.0f} +{r['markers']:.0f}"
        )

    if args.live:
        print_live(rows, args.live)


def print_live(rows: list[dict], seconds: int) -> None:
    print(
        f"\nlive refresh (no history, no alerts), median of {CYCLES}; the thread every {seconds} s on 8 GPUs"
    )
    print(
        f"{'database':<10} {'GPUs':>5} {'backend sample ms':>18} {'controller ms':>14} {'queries':>8} +BEGIN/COMMIT"
    )
    for r in rows:
        print(
            f"{r['database']:<10} {r['gpus']:>5} {r['live_sample_ms']:>18.2f} {r['live_controller_ms']:>14.2f} "
            f"{r['live_queries']:>8.0f} +2"
        )
    for r in rows:
        if "thread_ticks" in r:
            share = r["thread_cpu_s"] * 100 / r["thread_wall_s"]
            print(
                f"{r['database']:<10} thread: {r['thread_ticks']} ticks in {r['thread_wall_s']:.1f} s, "
                f"CPU {r['thread_cpu_s']:.2f} s = {share:.2f} % of a core, "
                f"{r['thread_cpu_s'] * 1000 / max(1, r['thread_ticks']):.1f} ms per tick"
            )


if __name__ == "__main__":
    main()
