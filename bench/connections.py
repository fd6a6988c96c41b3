"""Benchmark: PostgreSQL connections under load. The web server as the run command starts it (gunicorn with
uvicorn workers, `web_command`, 2 workers) on a throwaway database, 50 concurrent clients for a minute on a mix
of endpoints — GET /api/v1/gpus/, GET /api/v1/instances/ (an API token), the dashboard partial (a session) and
/healthz — while the database's connections are counted every second (pg_stat_activity). It prints the most
and the median connection count against the bound (workers x LLAMACONTROLLER_DB_POOL_SIZE), the requests per
second and the count of each status code (5xx must be 0).

    .venv/bin/python bench/connections.py                    # 50 clients, 60 s
    .venv/bin/python bench/connections.py --seconds 10       # shorter, while developing
    LLAMACONTROLLER_DB_POOL_SIZE=4 .venv/bin/python bench/connections.py --clients 20

The database (lc_bench_connections on 127.0.0.1:5432, or BENCH_DATABASE_URL) is created and dropped at the
end; an embedded Redis answers /healthz's broker check and the bench writes the host's heartbeat, as a worker
would (no worker runs: nothing here loads a model). Loopback addresses only."""

import argparse
import collections
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
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from api import create_database, drop_database, seed, setup_django  # noqa: E402  (the same throwaway database)

DEFAULT_URL = "postgres://postgres@127.0.0.1:5432/lc_bench_connections"
APP_NAME = "lc-bench-connections"  # the web server's connections carry it (libpq's PGAPPNAME)
WORKERS = 2  # as the run command starts it


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (default 50)")
    parser.add_argument("--seconds", type=int, default=60, help="how long they send requests (default 60)")
    parser.add_argument("--keep", action="store_true", help="keep the bench database")
    return parser.parse_args()


def count_connections(conn, database: str) -> tuple[int, int]:
    """(the web server's connections, all connections to the bench database but this one)."""
    row = conn.execute(
        "SELECT count(*) FILTER (WHERE application_name = %s), count(*) FROM pg_stat_activity "
        "WHERE datname = %s AND pid <> pg_backend_pid()",
        [APP_NAME, database],
    ).fetchone()
    return row[0], row[1]


def drive(base: str, token: str, session_key: str, clients: int, seconds: int):
    """`clients` threads, each sending the endpoints in turn on its own keep-alive session until the time is up."""
    import requests

    targets = [
        ("/api/v1/gpus/", {"Authorization": f"Bearer {token}"}, {}),
        ("/api/v1/instances/", {"Authorization": f"Bearer {token}"}, {}),
        ("/", {"HX-Request": "true"}, {"sessionid": session_key}),  # the dashboard partial
        ("/healthz", {}, {}),
    ]
    statuses: collections.Counter = collections.Counter()
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(n: int):
        mine: collections.Counter = collections.Counter()
        with requests.Session() as session:
            turn = n
            while time.monotonic() < deadline:
                path, headers, cookies = targets[turn % len(targets)]
                turn += 1
                try:
                    mine[
                        session.get(base + path, headers=headers, cookies=cookies, timeout=60).status_code
                    ] += 1
                except requests.RequestException as exc:
                    mine[type(exc).__name__] += 1
        with lock:
            statuses.update(mine)

    threads = [threading.Thread(target=client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses, time.perf_counter() - started


def main() -> None:
    args = parse_args()
    url = os.environ.get("BENCH_DATABASE_URL") or DEFAULT_URL
    if urlparse(url).hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"{url}: the benchmark uses loopback addresses only")
    database = urlparse(url).path.lstrip("/")
    data_dir = tempfile.mkdtemp(prefix="llamacontroller-bench-connections-")
    from llamacontroller_site.embedded_redis import EmbeddedRedis, free_port

    redis_server = EmbeddedRedis().start()
    env = dict(os.environ, DATABASE_URL=url, SECRET_KEY="bench-secret-key", DJANGO_SETTINGS_MODULE=
               "llamacontroller_site.settings", LLAMACONTROLLER_DATA_DIR=data_dir, LOG_LEVEL="WARNING",
               REDIS_URL=redis_server.url, LLAMACONTROLLER_HOST_NAME="benchhost")  # fmt: skip
    os.environ.update(env)
    create_database(url)
    import psycopg

    sampler_conn = psycopg.connect(url, autocommit=True)
    max_connections = sampler_conn.execute("SHOW max_connections").fetchone()[0]
    server = None
    log = open(Path(data_dir) / "gunicorn.log", "ab")  # noqa: SIM115
    try:
        setup_django()
        from django.conf import settings
        from django.db import connection
        from django.utils import timezone

        from gpus.models import Host
        from llamacontroller_site.runner import web_command

        token, session_key = seed()
        pool_size = settings.DB_POOL_SIZE
        connection.close()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        argv = web_command(Path(sys.executable).parent, bind=f"127.0.0.1:{port}", workers=WORKERS)
        argv[argv.index("--access-logfile") + 1] = "/dev/null"
        server = subprocess.Popen(argv, cwd=REPO, env=dict(env, PGAPPNAME=APP_NAME), stdout=log,
                                  stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        import requests

        deadline = time.monotonic() + 60
        while True:
            try:
                if requests.get(base + "/api/version", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(
                    "the web server did not start: see " + str(Path(data_dir) / "gunicorn.log")
                )
            time.sleep(0.2)

        web_counts, all_counts, stop = [], [], threading.Event()

        def sample():  # every second: the connections, and the host's heartbeat (/healthz wants a live worker)
            while not stop.wait(1.0):
                web, total = count_connections(sampler_conn, database)
                web_counts.append(web)
                all_counts.append(total)
                sampler_conn.execute(
                    f"UPDATE {Host._meta.db_table} SET last_seen = %s WHERE name = 'benchhost'",
                    [timezone.now()],
                )

        Host.objects.filter(name="benchhost").update(last_seen=timezone.now())
        connection.close()
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        statuses, wall = drive(base, token, session_key, args.clients, args.seconds)
        stop.set()
        sampler.join()
        time.sleep(1)
        after = count_connections(sampler_conn, database)
    finally:
        if server is not None:
            server.terminate()
            server.wait(15)
        log.close()
        sampler_conn.close()
        if not args.keep:
            drop_database(url)
        redis_server.stop()

    bound = WORKERS * pool_size if pool_size else None
    requests_done = sum(statuses.values())
    server_errors = sum(n for code, n in statuses.items() if not isinstance(code, int) or code >= 500)
    print(f"\n{args.clients} clients for {args.seconds} s, gunicorn + uvicorn workers x {WORKERS}, "
          f"LLAMACONTROLLER_DB_POOL_SIZE={pool_size}, PostgreSQL max_connections {max_connections}")  # fmt: skip
    print(f"web server's connections: max {max(web_counts, default=0)}, median "
          f"{statistics.median(web_counts) if web_counts else 0:g} (bound {bound or 'none: no pool'}); "
          f"all of the database's: max {max(all_counts, default=0)}; 1 s after the load: {after[0]}")  # fmt: skip
    print(f"requests: {requests_done} in {wall:.1f} s = {requests_done / wall:.0f}/s")
    print("status codes: " + ", ".join(f"{code} x {n}" for code, n in sorted(statuses.items(), key=str))
          + f"; 5xx and failures: {server_errors}")  # fmt: skip
    print("samples (web server's connections each second): " + " ".join(str(c) for c in web_counts))
    if bound and max(web_counts, default=0) > bound:
        sys.exit(f"over the bound: {max(web_counts)} > {bound}")
    if server_errors:
        sys.exit(f"{server_errors} requests failed (5xx or no answer)")


if __name__ == "__main__":
    main()
