"""Benchmark: latency (p50, p95) and requests per second of `GET /api/v1/instances/` and of the dashboard
partial (`GET /` with `HX-Request`), at 1 and 50 concurrent clients, served by gunicorn as the README runs
it, with 8 GPUs and 8 running instances — without sample history, then with 30 days of it at the default
refresh interval (about 1.4 million MemorySample rows, written by generate_series).

    .venv/bin/python bench/api.py
    DATABASE_URL=postgres://postgres@127.0.0.1:5432/llamacontroller_bench_api .venv/bin/python bench/api.py

The bench database is created (and dropped at the end unless --keep). Loopback addresses only; every run
sends a bounded number of requests."""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import urlparse

REPO = Path(__file__).resolve().parent.parent
DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/llamacontroller_bench_api"
GPUS = 8
HISTORY_DAYS = 30
REQUESTS = {1: 200, 50: 2000}  # total requests per run, by concurrency


def admin_connection(url: str):
    import psycopg

    parsed = urlparse(url)
    return psycopg.connect(parsed._replace(path="/postgres").geturl(), autocommit=True)


def create_database(url: str) -> None:
    name = urlparse(url).path.lstrip("/")
    with admin_connection(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')  # a kept one may still have sessions
        conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(url: str) -> None:
    name = urlparse(url).path.lstrip("/")
    with admin_connection(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def setup_django():
    sys.path.insert(0, str(REPO))
    import django

    django.setup()


def seed() -> tuple[str, str]:
    """8 GPUs, 8 running instances, a viewer; returns (API token, session cookie)."""
    from django.contrib.auth.models import Group, User
    from django.contrib.sessions.backends.db import SessionStore
    from django.core.management import call_command
    from django.utils import timezone

    from accounts.models import ApiToken
    from gpus.models import Gpu, Host
    from models_app.models import GpuInstance, InstanceGpu, ModelConfig

    call_command("migrate", verbosity=0)
    user = User.objects.create_user("bench", password="bench-password-123")
    user.groups.add(Group.objects.get(name="viewer"))
    _, token = ApiToken.issue(user, "bench")
    session = SessionStore()
    session.update({"_auth_user_id": str(user.pk), "_auth_user_backend": "django.contrib.auth.backends.ModelBackend",
                    "_auth_user_hash": user.get_session_auth_hash()})  # fmt: skip
    session.create()

    host = Host.objects.create(name="benchhost", last_seen=timezone.now())
    model = ModelConfig.objects.create(id="bench", name="Bench model", path="/models/bench.gguf")
    for i in range(GPUS):
        gpu = Gpu.objects.create(
            host=host, index=i, uuid=f"GPU-bench-{i}", name="Simulated H100", simulated=True,
            memory_total_mib=81559, memory_used_mib=5200, state=Gpu.State.MODEL_LOADED, updated_at=timezone.now(),
            processes=[{"pid": 1000 + i, "name": "llama-server", "used_mib": 5123, "owner": "instance",
                        "instance_id": None}],
        )  # fmt: skip
        instance = GpuInstance.objects.create(
            model=model, host=host, gpu_ids=str(i), status=GpuInstance.Status.RUNNING, owner=user,
            port=8081 + i, pid=1000 + i, loaded_at=timezone.now(), memory_used_mb=5123, memory_total_mb=81559,
            memory_source=GpuInstance.MemorySource.PROCESS, memory_updated_at=timezone.now(),
        )  # fmt: skip
        InstanceGpu.objects.create(instance=instance, gpu=gpu, position=0)
    return token, session.session_key


def insert_history() -> int:
    """30 days of one sample per GPU per refresh interval, in one INSERT ... SELECT."""
    from django.conf import settings
    from django.db import connection

    from gpus.models import Gpu, MemorySample

    step = settings.GPU_REFRESH_SECONDS
    table = MemorySample._meta.db_table
    with connection.cursor() as cursor:
        cursor.execute(
            f"""
            INSERT INTO {table} (gpu_id, instance_id, taken_at, used_mib, total_mib)
            SELECT g.id, NULL, now() - make_interval(secs => s * %s), 5000 + (s %% 200), g.memory_total_mib
            FROM {Gpu._meta.db_table} g, generate_series(1, %s) AS s
            """,
            [step, HISTORY_DAYS * 86400 // step],
        )
        cursor.execute(f"ANALYZE {table}")
        cursor.execute(f"SELECT count(*) FROM {table}")
        return cursor.fetchone()[0]


def start_gunicorn(env: dict, port: int, log) -> subprocess.Popen:
    argv = [sys.executable, "-m", "gunicorn", "llamacontroller_site.wsgi", "-b", f"127.0.0.1:{port}",
            "-w", "2", "--threads", "4", "--access-logfile", "-"]  # fmt: skip
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    import requests

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            requests.get(f"http://127.0.0.1:{port}/healthz", timeout=1)
            return proc
        except requests.ConnectionError:
            time.sleep(0.2)
    proc.terminate()
    raise RuntimeError("gunicorn did not start")


def run_load(url: str, headers: dict, cookies: dict, clients: int, total: int) -> dict:
    import requests

    latencies: list[float] = []
    errors = []
    lock = threading.Lock()
    per_client = total // clients

    def client():
        with requests.Session() as session:
            session.headers.update(headers)
            session.cookies.update(cookies)
            mine = []
            for _ in range(per_client):
                started = time.perf_counter()
                response = session.get(url, timeout=30)
                mine.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors.append(response.status_code)
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    wall = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    latencies.sort()
    return {
        "p50": statistics.median(latencies) * 1000,
        "p95": latencies[int(len(latencies) * 0.95) - 1] * 1000,
        "rps": len(latencies) / wall,
        "n": len(latencies),
        "errors": len(errors),
    }


def run_wrk(url: str, headers: dict, cookies: dict, connections: int = 50, seconds: int = 10) -> dict | None:
    """The same load from wrk (a C client, when installed): the Python client above spends much of the two
    cores itself. wrk reports p50/p90/p99, not p95. Bounded: `seconds` long, loopback only."""
    import re
    import shutil

    if shutil.which("wrk") is None:
        return None
    argv = ["wrk", "-t", "2", "-c", str(connections), "-d", f"{seconds}s", "--latency", url]
    for name, value in headers.items():
        argv[1:1] = ["-H", f"{name}: {value}"]
    if cookies:
        argv[1:1] = ["-H", "Cookie: " + "; ".join(f"{k}={v}" for k, v in cookies.items())]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 30).stdout

    def latency_ms(percent: str) -> float:
        value, unit = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M).groups()
        return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[unit]

    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    return {
        "p50": latency_ms("50"),
        "p90": latency_ms("90"),
        "p99": latency_ms("99"),
        "rps": float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1)),
        "errors": int(non_2xx.group(1)) if non_2xx else 0,
    }


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    args = parser.parse_args()
    url = os.environ.get("BENCH_DATABASE_URL") or os.environ.get("DATABASE_URL") or DEFAULT_URL
    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"{url}: the benchmark uses loopback addresses only")
    data_dir = tempfile.mkdtemp(prefix="llamacontroller-bench-")
    env = dict(os.environ, DATABASE_URL=url, SECRET_KEY="bench-secret-key", DJANGO_SETTINGS_MODULE=
               "llamacontroller_site.settings", LLAMACONTROLLER_DATA_DIR=data_dir, LOG_LEVEL="WARNING")  # fmt: skip
    os.environ.update(env)
    create_database(url)
    setup_django()
    token, session_key = seed()
    from django.db import connection

    from llamacontroller_site.embedded_redis import free_port

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    targets = [
        ("GET /api/v1/instances/", f"{base}/api/v1/instances/", {"Authorization": f"Bearer {token}"}, {}),
        ("dashboard partial", f"{base}/", {"HX-Request": "true"}, {"sessionid": session_key}),
    ]
    rows, wrk_rows = [], []
    log = open(Path(data_dir) / "gunicorn.log", "ab")  # noqa: SIM115
    server = start_gunicorn(env, port, log)
    try:
        for history in ("none", f"{HISTORY_DAYS} days"):
            samples = 0
            if history != "none":
                started = time.perf_counter()
                samples = insert_history()
                print(f"inserted {samples:,} samples in {time.perf_counter() - started:.1f} s", flush=True)
            connection.close()
            for label, target, headers, cookies in targets:
                run_load(target, headers, cookies, 4, 40)  # warm up both workers
                for clients, total in REQUESTS.items():
                    result = run_load(target, headers, cookies, clients, total)
                    rows.append((label, history, samples, clients, result))
                wrk = run_wrk(target, headers, cookies)
                if wrk:
                    wrk_rows.append((label, history, samples, wrk))
    finally:
        server.terminate()
        server.wait(10)
        log.close()
        connection.close()
        if not args.keep:
            drop_database(url)

    print(f"\ngunicorn -w 2 --threads 4, PostgreSQL, {GPUS} GPUs, {GPUS} running instances\n")
    header = f"{'endpoint':<24} {'history':<8} {'samples':>10} {'clients':>7} {'p50 ms':>8} {'p95 ms':>8} " \
             f"{'req/s':>8} {'errors':>6}"  # fmt: skip
    print(header)
    print("-" * len(header))
    for label, history, samples, clients, r in rows:
        print(f"{label:<24} {history:<8} {samples:>10,} {clients:>7} {r['p50']:>8.1f} {r['p95']:>8.1f} "
              f"{r['rps']:>8.0f} {r['errors']:>6}")  # fmt: skip
    if wrk_rows:
        print("\nthe same at 50 connections from wrk (C client, 10 s each)\n")
        header = f"{'endpoint':<24} {'history':<8} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>6}"
        print(header)
        print("-" * len(header))
        for label, history, _samples, r in wrk_rows:
            print(f"{label:<24} {history:<8} {r['p50']:>8.1f} {r['p90']:>8.1f} {r['p99']:>8.1f} "
                  f"{r['rps']:>8.0f} {r['errors']:>6}")  # fmt: skip


if __name__ == "__main__":
    main()
