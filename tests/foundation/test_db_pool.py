"""PostgreSQL connections stay bounded: a pool per process (LLAMACONTROLLER_DB_POOL_SIZE), given back after
each request, task and gateway call; a forked child does not use its parent's; a pool exhausted answers 503."""

import json
import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
from django.db import connection
from django.test import Client

from accounts.models import ApiToken
from gateway.models import UsageRecord
from tests.conftest import REPO, worker_env
from tests.helpers import web_server

postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="the connection pool is PostgreSQL's (SQLite has none)"
)


def settings_in_subprocess(tmp_path, **env) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMACONTROLLER_", "DATABASE_URL"))}
    base.update(
        DJANGO_SETTINGS_MODULE="llamacontroller_site.settings",
        SECRET_KEY="x",
        LLAMACONTROLLER_DATA_DIR=str(tmp_path),
        REDIS_URL="redis://127.0.0.1:1/0",
        **env,
    )
    code = "from django.conf import settings; import json; print(json.dumps(settings.DATABASES['default'], default=str))"
    return subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=base, capture_output=True, text=True, timeout=60
    )


def test_postgres_gets_a_bounded_pool_and_no_persistent_connections(tmp_path):
    url = "postgres://user@db.example:5432/lc"
    default = json.loads(settings_in_subprocess(tmp_path, DATABASE_URL=url).stdout)
    assert default["CONN_MAX_AGE"] == 0 and default["CONN_HEALTH_CHECKS"] is True
    assert default["OPTIONS"]["pool"] == {"min_size": 1, "max_size": 8, "timeout": 10, "max_idle": 60}
    sized = settings_in_subprocess(
        tmp_path, DATABASE_URL=url, LLAMACONTROLLER_DB_POOL_SIZE="3", LLAMACONTROLLER_DB_POOL_TIMEOUT="2"
    )
    assert json.loads(sized.stdout)["OPTIONS"]["pool"]["max_size"] == 3
    assert json.loads(sized.stdout)["OPTIONS"]["pool"]["timeout"] == 2
    off = settings_in_subprocess(tmp_path, DATABASE_URL=url, LLAMACONTROLLER_DB_POOL_SIZE="0")
    assert "pool" not in json.loads(off.stdout).get("OPTIONS", {})
    sqlite = json.loads(settings_in_subprocess(tmp_path).stdout)
    assert "pool" not in sqlite["OPTIONS"]
    bad = settings_in_subprocess(tmp_path, DATABASE_URL=url, LLAMACONTROLLER_DB_POOL_SIZE="many")
    assert bad.returncode != 0 and "LLAMACONTROLLER_DB_POOL_SIZE='many' is not an integer" in bad.stderr


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_a_forked_child_does_not_use_its_parents_pooled_connection():
    """A Celery pool process is forked from the worker's main process, whose pool holds idle connections."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT clock_timestamp()")
        before_fork = cursor.fetchone()[0]
    connection.close()  # back to the pool, idle: what a fork finds
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one query through the ORM; was its connection opened after the fork?
        try:
            with connection.cursor() as cursor:
                cursor.execute(
                    "SELECT backend_start > %s FROM pg_stat_activity WHERE pid = pg_backend_pid()",
                    [before_fork],
                )
                os.write(write, b"new" if cursor.fetchone()[0] else b"inherited")
            connection.close()
        finally:
            os._exit(0)
    os.close(write)
    answer = os.read(read, 100)
    os.waitpid(pid, 0)
    os.close(read)
    assert answer == b"new"
    with connection.cursor() as cursor:  # the parent's pool still serves
        cursor.execute("SELECT 1")
        assert cursor.fetchone()[0] == 1


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_an_exhausted_pool_answers_503_not_a_hang(client, users):
    token = ApiToken.issue(users["viewer"], "pool test")[1]
    pool = connection.pool
    connection.close()
    held, timeout = [], pool.timeout
    pool.timeout = 0.5
    try:
        while True:  # borrow every connection the pool may open
            try:
                held.append(pool.getconn(timeout=0.5))
            except Exception:
                break
        started = time.monotonic()
        response = client.post(
            "/v1/chat/completions",
            {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}]},
            content_type="application/json",
            HTTP_AUTHORIZATION=f"Bearer {token}",
        )
        assert time.monotonic() - started < 5
        assert response.status_code == 503, response.content
        error = response.json()["error"]
        assert error["code"] == "database_busy" and "the database is busy" in error["message"]
        assert response["Retry-After"] == "1"
        started = time.monotonic()  # the REST API likewise (llamacontroller_site/errors.py)
        response = Client(raise_request_exception=False).get(
            "/api/v1/gpus/", HTTP_AUTHORIZATION=f"Bearer {token}"
        )
        assert time.monotonic() - started < 5
        assert response.status_code == 503, response.content
        assert "couldn't get a connection" in response.json()["detail"]
    finally:
        for conn in held:
            pool.putconn(conn)
        pool.timeout = timeout
    assert not UsageRecord.objects.exists()  # refused before the caller was known: nothing to record


# --- the web server as the run command starts it ---------------------------------------------------


def connection_count(app_name: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = %s",
            [app_name],
        )
        return cursor.fetchone()[0]


@postgres_only
@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_12_concurrent_requests_for_7_rounds_stay_under_the_bound(tmp_path, users, fake_gpus):
    """The issue: 12 concurrent GET /api/v1/gpus/ for 7 rounds left 57 connections (each request thread of a
    web worker kept its own for 60 s). Now: at most 2 workers x LLAMACONTROLLER_DB_POOL_SIZE."""
    workers, pool_size, app_name = 2, 3, f"lc-pool-test-{os.getpid()}"
    token = ApiToken.issue(users["viewer"], "pool test")[1]
    env = worker_env(LLAMACONTROLLER_DB_POOL_SIZE=pool_size, PGAPPNAME=app_name)  # libpq reads PGAPPNAME
    log_path = tmp_path / "web.log"
    with web_server(env, log_path, workers=workers) as url:
        counts, statuses, stop = [], [], threading.Event()

        def sample():
            while not stop.is_set():
                counts.append(connection_count(app_name))
                time.sleep(0.05)
            connection.close()

        sampler = threading.Thread(target=sample)
        sampler.start()
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(timeout=30, limits=httpx.Limits(max_connections=12)) as http:
            for _ in range(7):
                threads = [
                    threading.Thread(
                        target=lambda: statuses.append(
                            http.get(url + "/api/v1/gpus/", headers=headers).status_code
                        )
                    )
                    for _ in range(12)
                ]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
        stop.set()
        sampler.join()
        after = connection_count(app_name)
    assert statuses == [200] * 84, log_path.read_text()[-3000:]
    assert counts and max(counts) <= workers * pool_size, (max(counts), counts)
    assert after <= workers * pool_size


@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_thread_holds_no_connection_between_beats(fake_gpus, settings, monkeypatch):
    """The worker's main process beats every few seconds for ever: its connection goes back after each beat."""
    from django.db import connections

    from models_app import cluster

    settings.HOST_HEARTBEAT_SECONDS = 0.01
    open_at_entry, beats = [], threading.Event()

    def heartbeat(host_name, me):
        open_at_entry.append(connections["default"].connection is not None)
        with connections["default"].cursor() as cursor:  # what a beat does: a query
            cursor.execute("SELECT 1")
        if len(open_at_entry) >= 3:
            beats.set()
        return True

    monkeypatch.setattr(cluster, "heartbeat", heartbeat)
    thread = cluster.Heartbeat(fake_gpus.host.name, cluster.this_worker())
    thread.start()
    assert beats.wait(10)
    thread.stop()
    thread.join(5)
    assert open_at_entry[:3] == [False, False, False]
