"""Benchmark: the cluster at scale. Simulated hosts of 8 GPUs each (5, 10, 25 and 50 hosts: up to 400 GPUs),
4 running instances per host (200 at 50 hosts), one host in ten down (its instances `unknown`). For each size:
the median time of RUNS requests and the query count of the dashboard partial (`GET /` with `HX-Request`,
an admin signed in), the instance list, the GPU list and the host list (`?limit=1000`: every row, one page);
and the time of one call of `dispatch_refresh` and `dispatch_reconcile`, the beat fan-out (one message per
live host), sent to an embedded Redis that no worker reads (a real publish per host, after the once-per-period
lock), and with the sender (utilities.dispatch.publish) replaced by a counter (the lock, the database read and the loop).

    .venv/bin/python bench/scale.py                      # PostgreSQL on 127.0.0.1:5432 (trust auth)
    .venv/bin/python bench/scale.py --database sqlite    # a temporary SQLite file
    .venv/bin/python bench/scale.py --sizes 5,50 --runs 10

The hosts are registered through the real inventory code with the fake telemetry backend (one fake-GPU file
per host, in-process: no worker runs); the instances are rows, as a worker leaves them. Requests go through
Django's test client in-process (the whole view: session, permissions, queries, template or serializer), so
the figures are the server's own time, not the network's. The PostgreSQL database (lc_bench_scale) is created
and dropped at the end (unless --keep); the SQLite file lives in a temporary folder. Loopback only."""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from api import create_database, drop_database  # noqa: E402  (bench/api.py: the same throwaway database)

DEFAULT_PG = "postgres://postgres@127.0.0.1:5432/lc_bench_scale"
GPUS_PER_HOST = 8
INSTANCES_PER_HOST = 4
DOWN_EVERY = 10  # one host in ten is down
ENDPOINTS = [
    ("dashboard", "/", {"HTTP_HX_REQUEST": "true", "HTTP_HX_CURRENT_URL": "http://127.0.0.1/"}),
    ("instances", "/api/v1/instances/?limit=1000", {}),
    ("gpus", "/api/v1/gpus/?limit=1000", {}),
    ("hosts", "/api/v1/hosts/?limit=1000", {}),
]


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--database", choices=["postgres", "sqlite"], default="postgres")
    parser.add_argument("--sizes", default="5,10,25,50", help="host counts, ascending (default 5,10,25,50)")
    parser.add_argument("--runs", type=int, default=20, help="requests per endpoint and size (default 20)")
    parser.add_argument("--keep", action="store_true", help="keep the PostgreSQL database")
    return parser.parse_args()


def prepare_environment(data: Path, database_url: str) -> None:
    placeholder = data / "fake-gpus.json"  # each host gets its own file in add_hosts
    placeholder.write_text(json.dumps({"gpus": []}))
    os.environ.update(
        DJANGO_SETTINGS_MODULE="llamacontroller_site.settings",
        DATABASE_URL=database_url,
        SECRET_KEY="bench-not-secret",
        LLAMACONTROLLER_DATA_DIR=str(data),
        LLAMACONTROLLER_MODEL_DIRS=str(data / "models"),
        LLAMACONTROLLER_GPU_BACKEND="fake",
        LLAMACONTROLLER_FAKE_GPUS=str(placeholder),
        LOG_LEVEL="WARNING",
    )
    os.environ.pop("DEBUG", None)


def add_hosts(start: int, stop: int, data: Path, model, owner) -> None:
    """Hosts bench-<start>..bench-<stop - 1>: registered with 8 fake GPUs each, 4 instances on 2 GPUs each."""
    from datetime import timedelta

    from django.conf import settings
    from django.utils import timezone

    from gpus import services
    from gpus.models import Gpu, Host
    from models_app.models import GpuInstance, InstanceGpu

    for n in range(start, stop):
        name = f"bench-{n:02d}"
        fake = data / f"fake-gpus-{name}.json"
        gpus = [{"index": i, "uuid": f"GPU-{name}-{i}", "name": "Simulated H100", "memory_total_mib": 81559,
                 "baseline_used_mib": 10, "foreign_processes": []} for i in range(GPUS_PER_HOST)]  # fmt: skip
        fake.write_text(json.dumps({"gpus": gpus, "fail": None, "hang_seconds": 0}))
        settings.FAKE_GPUS_FILE = str(fake)
        host = services.register_host(name)
        down = n % DOWN_EVERY == DOWN_EVERY - 1
        seen = timezone.now() - timedelta(hours=1) if down else timezone.now()
        Host.objects.filter(pk=host.pk).update(
            last_seen=seen, worker_hostname=f"node{n}.example", worker_pid=1000 + n, address=f"10.0.{n}.1",
        )  # fmt: skip
        host_gpus = list(host.gpus.order_by("index"))
        for k in range(INSTANCES_PER_HOST):
            pair = host_gpus[2 * k : 2 * k + 2]
            instance = GpuInstance.objects.create(
                model=model, host=host, gpu_ids=",".join(str(g.index) for g in pair), owner=owner,
                status=GpuInstance.Status.UNKNOWN if down else GpuInstance.Status.RUNNING,
                port=18000 + k, pid=20000 + k, loaded_at=seen, memory_used_mb=10246, memory_total_mb=163118,
                memory_source=GpuInstance.MemorySource.PROCESS, memory_updated_at=seen,
            )  # fmt: skip
            for position, gpu in enumerate(pair):
                InstanceGpu.objects.create(instance=instance, gpu=gpu, position=position)
                Gpu.objects.filter(pk=gpu.pk).update(
                    state=Gpu.State.UNAVAILABLE if down else Gpu.State.MODEL_LOADED,
                    state_reason=host.down_reason() if down else "",
                    memory_used_mib=5133,
                    processes=[{"pid": 20000 + k, "name": "llama-server", "used_mib": 5123, "owner": "instance",
                                "instance_id": instance.pk}],
                )  # fmt: skip


def time_requests(client, path: str, headers: dict, runs: int) -> dict:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    with CaptureQueriesContext(connection) as captured:
        response = client.get(path, **headers)
    assert response.status_code == 200, (path, response.status_code, response.content[:300])
    queries, size = len(captured), len(response.content)
    client.get(path, **headers)  # warm
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        client.get(path, **headers)
        times.append((time.perf_counter() - started) * 1000)
    return {"ms": statistics.median(times), "queries": queries, "kib": size / 1024}


def release_period_locks() -> None:
    """The dispatchers act once per period (utilities/periodic.py: a Redis lock); each timed call gets a fresh
    period, so that it pays the lock and fans out. Our own embedded Redis: nobody else's locks."""
    from utilities import periodic

    client = periodic.redis_client()
    keys = list(client.scan_iter(match=periodic.KEY_PREFIX + "*"))
    if keys:
        client.delete(*keys)


def time_dispatch(runs: int) -> dict:
    """One call of each dispatcher: to the embedded broker, and with the sender counting instead."""
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from models_app import tasks

    result = {}
    for name in ("refresh", "reconcile"):
        dispatch = getattr(tasks, f"dispatch_{name}")
        release_period_locks()
        dispatch()  # warm: the broker connection and the queues' declaration
        times = []
        for _ in range(runs):
            release_period_locks()
            started = time.perf_counter()
            sent = dispatch()
            times.append((time.perf_counter() - started) * 1000)
        assert sent is not None, f"dispatch_{name} did not act (period lock held?)"
        with mock.patch("utilities.dispatch.publish") as counter:
            release_period_locks()
            with CaptureQueriesContext(connection) as captured:
                dispatch()
            assert counter.call_count == sent, (counter.call_count, sent)
            bare = []
            for _ in range(runs):
                release_period_locks()
                started = time.perf_counter()
                dispatch()
                bare.append((time.perf_counter() - started) * 1000)
        result[name] = {
            "ms": statistics.median(times), "bare_ms": statistics.median(bare), "messages": sent,
            "queries": len(captured),
        }  # fmt: skip
    return result


def main():
    args = parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    data = Path(tempfile.mkdtemp(prefix="llamacontroller-bench-scale-"))
    (data / "models").mkdir()
    if args.database == "postgres":
        url = os.environ.get("BENCH_POSTGRES_URL", DEFAULT_PG)
        if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
            sys.exit(f"{url}: the benchmark uses loopback addresses only")
        create_database(url)
    else:
        url = f"sqlite:///{data / 'bench.sqlite3'}"
    prepare_environment(data, url)
    warnings.filterwarnings("ignore", message="No directory at")  # no collectstatic: pages only

    # The fan-out publishes to an embedded Redis of its own, never to a REDIS_URL of the environment.
    from llamacontroller_site.embedded_redis import EmbeddedRedis

    redis_server = EmbeddedRedis(log_file=data / "redis.log").start()
    os.environ["REDIS_URL"] = redis_server.url
    rows = []
    try:
        import django

        django.setup()
        from django.contrib.auth.models import User
        from django.core.management import call_command
        from django.db import connection
        from django.test import Client

        from models_app.models import ModelConfig

        call_command("migrate", verbosity=0)
        admin = User.objects.create_superuser("bench", "bench@example.com", "bench-password-123")
        model = ModelConfig.objects.create(id="bench", name="Bench model", path=str(data / "models/b.gguf"))
        client = Client(HTTP_HOST="127.0.0.1")
        client.force_login(admin)
        made = 0
        for size in sizes:
            started = time.perf_counter()
            add_hosts(made, size, data, model, admin)
            made = size
            if connection.vendor == "postgresql":
                with connection.cursor() as cursor:
                    cursor.execute("ANALYZE")
            print(f"{size} hosts seeded in {time.perf_counter() - started:.1f} s", flush=True)
            row = {"size": (size, size * GPUS_PER_HOST, size * INSTANCES_PER_HOST)}
            for label, path, headers in ENDPOINTS:
                row[label] = time_requests(client, path, headers, args.runs)
            row.update(time_dispatch(args.runs))
            rows.append(row)
    finally:
        from django.db import connections

        connections.close_all()
        redis_server.stop()
        if args.database == "postgres" and not args.keep:
            drop_database(url)

    vendor = "PostgreSQL" if args.database == "postgres" else "SQLite"
    print(f"\n{vendor}; median of {args.runs} requests (ms) and queries per request; one host in "
          f"{DOWN_EVERY} down\n")  # fmt: skip
    header = (f"{'hosts':>5} {'GPUs':>5} {'inst':>5} | {'dashboard':>15} {'KiB':>5} | {'instances':>13} | "
              f"{'gpus':>13} | {'hosts':>12} | {'refresh ms (msgs)':>22} | {'reconcile ms (msgs)':>22}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for r in rows:

        def cell(name, r=r):
            return f"{r[name]['ms']:7.1f} ms {r[name]['queries']:2d} q"

        def fan(name, r=r):
            d = r[name]
            return f"{d['ms']:5.1f} / {d['bare_ms']:4.1f} ({d['messages']:2d}, {d['queries']} q)"

        hosts, gpus, instances = r["size"]
        print(f"{hosts:>5} {gpus:>5} {instances:>5} | {cell('dashboard'):>15} "
              f"{r['dashboard']['kib']:5.0f} | {cell('instances'):>13} | {cell('gpus'):>13} | "
              f"{cell('hosts'):>12} | {fan('refresh'):>22} | {fan('reconcile'):>22}")  # fmt: skip
    print("\nrefresh / reconcile: to the embedded broker / with the sender counting (messages sent, queries)")


if __name__ == "__main__":
    main()
