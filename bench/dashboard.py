"""Benchmark: what the live dashboard costs the web server. One host of 8 simulated GPUs with 4 running
instances (bench/scale.py's rows), a real web server (`./lc.sh run`'s gunicorn with one uvicorn worker, on
loopback) and N open dashboards (threads), each fetching the live cards (`GET /?part=live`, as htmx polls them)
every INTERVAL seconds for DURATION seconds. Reported: the web server's CPU over that time (its processes' user +
system time from psutil, as a share of one core), the median and 95th percentile of an update's time as the
browsers saw it, the size of an update, and the database queries of one update (counted in-process through
Django's test client: the same view).

    .venv/bin/python bench/dashboard.py                               # 10 dashboards, every 3 s, 30 s
    .venv/bin/python bench/dashboard.py --dashboards 10 --interval 1 --duration 30

SQLite in a temporary folder; no worker runs (the rows are what a worker leaves); loopback only."""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import warnings
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))
from scale import add_hosts, prepare_environment  # noqa: E402  (the same seeded rows as the scale benchmark)

LIVE = "/?part=live"
HTMX = {"HX-Request": "true", "HX-Current-URL": "http://127.0.0.1/"}


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dashboards", type=int, default=10)
    parser.add_argument("--interval", type=float, default=3.0, help="seconds between one dashboard's updates")
    parser.add_argument("--duration", type=float, default=30.0)
    return parser.parse_args()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def queries_per_update(client) -> tuple[int, int]:
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    headers = {"HTTP_HX_REQUEST": "true", "HTTP_HX_CURRENT_URL": "http://127.0.0.1/"}
    client.get(LIVE, **headers)  # warm
    with CaptureQueriesContext(connection) as captured:
        response = client.get(LIVE, **headers)
    assert response.status_code == 200, response.content[:300]
    return len(captured), len(response.content)


def poll(base: str, cookie: str, interval: float, until: float, times: list, errors: list) -> None:
    """One open dashboard: an update every `interval` seconds (started at a random phase by the caller)."""
    request = urllib.request.Request(base + LIVE, headers={**HTMX, "Cookie": cookie})
    next_at = time.monotonic()
    while next_at < until:
        started = time.monotonic()
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                response.read()
                if response.status != 200:
                    errors.append(response.status)
        except OSError as exc:
            errors.append(str(exc))
        times.append((time.monotonic() - started) * 1000)
        next_at += interval
        time.sleep(max(0.0, next_at - time.monotonic()))


def cpu_seconds(process: psutil.Process) -> float:
    total = 0.0
    for p in [process, *process.children(recursive=True)]:
        try:
            t = p.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            pass
    return total


def main():
    args = parse_args()
    data = Path(tempfile.mkdtemp(prefix="llamacontroller-bench-dashboard-"))
    (data / "models").mkdir()
    prepare_environment(data, f"sqlite:///{data / 'bench.sqlite3'}")
    os.environ["REDIS_URL"] = "redis://127.0.0.1:1/0"  # the live cards read only the database
    warnings.filterwarnings("ignore", message="No directory at")
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.test import Client

    from llamacontroller_site.runner import web_command
    from models_app.models import ModelConfig

    call_command("migrate", verbosity=0)
    call_command("collectstatic", interactive=False, verbosity=0)
    admin = User.objects.create_superuser("bench", "bench@example.com", "bench-password-123")
    model = ModelConfig.objects.create(id="bench", name="Bench model", path=str(data / "models/b.gguf"))
    add_hosts(0, 1, data, model, admin)  # 8 GPUs, 4 instances on 2 GPUs each
    client = Client(HTTP_HOST="127.0.0.1")
    client.force_login(admin)
    queries, size = queries_per_update(client)
    cookie = f"{settings.SESSION_COOKIE_NAME}={client.cookies[settings.SESSION_COOKIE_NAME].value}"

    port = free_port()
    env = {**os.environ, "ALLOWED_HOSTS": "127.0.0.1,localhost"}
    server = subprocess.Popen(
        web_command(Path(sys.executable).parent, bind=f"127.0.0.1:{port}", workers=1),
        cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(100):  # the server up
            try:
                urllib.request.urlopen(base + "/healthz", timeout=1).read()
                break
            except OSError:
                time.sleep(0.2)
        warm_times, warm_errors = [], []
        poll(base, cookie, 0.05, time.monotonic() + 1, warm_times, warm_errors)
        assert not warm_errors, warm_errors[:3]
        handle = psutil.Process(server.pid)
        times, errors = [], []
        until = time.monotonic() + args.duration
        cpu_before, wall_before = cpu_seconds(handle), time.monotonic()
        threads = []
        for _ in range(args.dashboards):  # dashboards opened at different moments, as people open them
            thread = threading.Thread(target=poll, args=(base, cookie, args.interval, until, times, errors))
            thread.start()
            threads.append(thread)
            time.sleep(args.interval / args.dashboards)
        for thread in threads:
            thread.join()
        cpu, wall = cpu_seconds(handle) - cpu_before, time.monotonic() - wall_before
    finally:
        server.terminate()
        server.wait(timeout=15)

    times.sort()
    p95 = times[int(len(times) * 0.95) - 1] if times else float("nan")
    print(f"{args.dashboards} dashboards, one update each every {args.interval:g} s, for {wall:.0f} s; "
          f"8 GPUs, 4 instances; SQLite; 1 web worker")  # fmt: skip
    print(f"updates: {len(times)} ({len(times) / wall:.1f}/s), errors: {len(errors)}")
    print(f"web server CPU: {cpu:.2f} s in {wall:.0f} s = {cpu * 100 / wall:.1f} % of one core "
          f"({cpu * 1000 / max(1, len(times)):.1f} ms CPU per update)")  # fmt: skip
    print(f"update time: median {statistics.median(times):.1f} ms, p95 {p95:.1f} ms; {size / 1024:.1f} KiB; "
          f"{queries} queries per update")  # fmt: skip


if __name__ == "__main__":
    main()
