"""Benchmark: latency of the memory history endpoints (`GET /api/v1/gpus/{id}/history/` and
`GET /api/v1/instances/{id}/history/`) for the 1 h, 24 h and 7 d windows, over 30 days of samples at the
default 15 s refresh for 4 GPUs and 4 instances: 8 series × 172,800 = 1,382,400 MemorySample rows, written by
one INSERT … SELECT (generate_series on PostgreSQL, a recursive CTE on SQLite).

    .venv/bin/python bench/history.py                 # SQLite (a temporary file) and PostgreSQL
    .venv/bin/python bench/history.py --only sqlite
    BENCH_POSTGRES_URL=postgres://postgres@127.0.0.1:5432/llamacontroller_bench_history .venv/bin/python bench/history.py

Requests go through Django's test client in-process (the whole view: authentication, the GROUP BY, the events,
serialisation), so the figures are the server's own time, not the network's. The PostgreSQL database is
created and dropped; the SQLite file lives in a temporary folder."""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
DEFAULT_PG = "postgres://postgres@127.0.0.1:5432/llamacontroller_bench_history"
SERIES_GPUS = 4
SERIES_INSTANCES = 4
DAYS = 30
STEP = 15
RUNS = 25


def run_one(url: str) -> dict:
    """In a fresh process with DATABASE_URL=url: migrate, seed, insert history, time the endpoints."""
    sys.path.insert(0, str(REPO))
    import django

    django.setup()
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django.db import connection
    from django.test import Client
    from django.utils import timezone

    from accounts.models import ApiToken
    from gpus.models import Gpu, Host, MemorySample
    from models_app.models import GpuInstance, InstanceGpu, ModelConfig

    call_command("migrate", verbosity=0)
    user = User.objects.create_user("bench", password="bench-password-123")
    user.groups.add(Group.objects.get(name="viewer"))
    _, token = ApiToken.issue(user, "bench")
    host = Host.objects.create(name="benchhost", last_seen=timezone.now())
    model = ModelConfig.objects.create(id="bench", name="Bench model", path="/models/bench.gguf")
    gpus, instances = [], []
    for i in range(SERIES_GPUS):
        gpu = Gpu.objects.create(
            host=host, index=i, uuid=f"GPU-bench-{i}", name="Simulated H100", simulated=True,
            memory_total_mib=81559, memory_used_mib=5200, state=Gpu.State.MODEL_LOADED,
        )  # fmt: skip
        instance = GpuInstance.objects.create(
            model=model, host=host, gpu_ids=str(i), status=GpuInstance.Status.RUNNING, port=8081 + i, pid=1000 + i,
            loaded_at=timezone.now(), memory_used_mb=5123, memory_total_mb=81559,
        )  # fmt: skip
        InstanceGpu.objects.create(instance=instance, gpu=gpu, position=0)
        gpus.append(gpu)
        instances.append(instance)

    table = MemorySample._meta.db_table
    count = DAYS * 86400 // STEP
    started = time.perf_counter()
    with connection.cursor() as cursor:
        for gpu, instance in zip(gpus, instances, strict=True):
            for gpu_id, instance_id in ((gpu.pk, None), (None, instance.pk)):
                if connection.vendor == "postgresql":
                    cursor.execute(
                        f"INSERT INTO {table} (gpu_id, instance_id, taken_at, used_mib, total_mib) "
                        "SELECT %s, %s, now() - make_interval(secs => s * %s), 5000 + (s %% 200), 81559 "
                        "FROM generate_series(1, %s) AS s",
                        [gpu_id, instance_id, STEP, count],
                    )
                else:
                    cursor.execute(
                        f"WITH RECURSIVE s(n) AS (SELECT 1 UNION ALL SELECT n + 1 FROM s WHERE n < %s) "
                        f"INSERT INTO {table} (gpu_id, instance_id, taken_at, used_mib, total_mib) "
                        "SELECT %s, %s, strftime('%%Y-%%m-%%d %%H:%%M:%%f', 'now', '-' || (n * %s) || ' seconds'), "
                        "5000 + (n %% 200), 81559 FROM s",
                        [count, gpu_id, instance_id, STEP],
                    )
        cursor.execute(f"ANALYZE {table}")
        cursor.execute(f"SELECT count(*) FROM {table}")
        rows = cursor.fetchone()[0]
    insert_s = time.perf_counter() - started

    client = Client(HTTP_AUTHORIZATION=f"Bearer {token}", HTTP_HOST="127.0.0.1")
    results = []
    for kind, pk in (("gpus", gpus[0].pk), ("instances", instances[0].pk)):
        for window in ("1h", "24h", "7d"):
            url_path = f"/api/v1/{kind}/{pk}/history/?window={window}"
            response = client.get(url_path)  # warm
            assert response.status_code == 200, response.content[:300]
            points = len(response.json()["points"])
            times = []
            for _ in range(RUNS):
                t0 = time.perf_counter()
                client.get(url_path)
                times.append((time.perf_counter() - t0) * 1000)
            times.sort()
            results.append(
                {
                    "endpoint": f"{kind}/{{id}}/history", "window": window, "points": points,
                    "p50_ms": round(statistics.median(times), 1), "p95_ms": round(times[int(len(times) * 0.95) - 1], 1),
                }
            )  # fmt: skip
    return {"database": connection.vendor, "rows": rows, "insert_s": round(insert_s, 1), "results": results}


def spawn(url: str) -> dict:
    env = dict(os.environ, DATABASE_URL=url, DJANGO_SETTINGS_MODULE="llamacontroller_site.settings")
    env.setdefault("SECRET_KEY", "bench-secret-key")
    env.setdefault("LLAMACONTROLLER_DATA_DIR", tempfile.mkdtemp(prefix="lc-bench-history-"))
    env["LOG_LEVEL"] = "WARNING"
    out = subprocess.run(
        [sys.executable, __file__, "--one", url],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def pg_admin(url: str, sql: str) -> None:
    import psycopg

    parsed = urlparse(url)
    with psycopg.connect(parsed._replace(path="/postgres").geturl(), autocommit=True) as conn:
        conn.execute(sql)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=["sqlite", "postgres"])
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one)))
        return
    reports = []
    if args.only in (None, "sqlite"):
        with tempfile.TemporaryDirectory(prefix="lc-bench-history-") as folder:
            reports.append(spawn(f"sqlite:///{folder}/bench.sqlite3"))
    if args.only in (None, "postgres"):
        url = os.environ.get("BENCH_POSTGRES_URL", DEFAULT_PG)
        name = urlparse(url).path.lstrip("/")
        pg_admin(url, f'DROP DATABASE IF EXISTS "{name}"')
        pg_admin(url, f'CREATE DATABASE "{name}"')
        try:
            reports.append(spawn(url))
        finally:
            pg_admin(url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    print(f"history endpoint latency, {RUNS} requests each, in-process (Django test client)")
    print(
        f"{'database':<11}{'rows':>10}  {'endpoint':<24}{'window':<8}{'points':>7}{'p50 ms':>9}{'p95 ms':>9}"
    )
    for report in reports:
        for r in report["results"]:
            print(
                f"{report['database']:<11}{report['rows']:>10}  {r['endpoint']:<24}{r['window']:<8}"
                f"{r['points']:>7}{r['p50_ms']:>9}{r['p95_ms']:>9}"
            )
        print(f"  ({report['database']}: history inserted in {report['insert_s']} s)")


if __name__ == "__main__":
    main()
