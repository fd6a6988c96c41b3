"""The real run command (`python -m llamacontroller_site.runner`, what `./lc.sh run` execs) with its own data
folder, SQLite database, embedded Redis, host name and the real llama-server serving the tiny model, through the
faults of issue 16: a second run in the same folder, the runner killed (SIGKILL) or hung up on (SIGHUP), its
embedded Redis killed, a llama-server killed before the stop. Afterwards no process that carries the data folder
(in its command line or environment) may be left."""

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
import pytest
import redis

from llamacontroller_site.embedded_redis import free_port
from llamacontroller_site.supervision import AlreadyRunning, lock_data_folder
from tests.conftest import REPO, TEST_RUN_ID
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e]

START_TIMEOUT = 120  # two busy cores: migrations, collectstatic, the tiny model, gunicorn, celery


class Run:
    """One run command and its data folder; its output in run-N.log there."""

    def __init__(self, tmp_path: Path, llama_server: str):
        self.data = tmp_path / "data"
        self.port = free_port()
        self.host = f"rc-{uuid.uuid4().hex[:8]}"
        skip = ("LLAMACONTROLLER_", "DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DJANGO_SETTINGS_MODULE")
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
        self.env.update(
            LLAMACONTROLLER_DATA_DIR=str(self.data),
            LLAMACONTROLLER_BIND=f"127.0.0.1:{self.port}",
            LLAMACONTROLLER_HOST_NAME=self.host,
            LLAMACONTROLLER_LLAMA_SERVER=llama_server,
            LLAMACONTROLLER_ADMIN_PASSWORD="pw-admin-123",
            # No reconcile pass during the test: what the stop records is the stop's own doing.
            LLAMACONTROLLER_RECONCILE_SECONDS="600",
            LLAMACONTROLLER_TEST_RUN=TEST_RUN_ID,  # leftovers are found by the suite's teardown too
            PYTHONUNBUFFERED="1",
        )
        self.count = 0

    def start(self, reader_gone: bool = False) -> subprocess.Popen:
        """With `reader_gone`, its standard output is a pipe whose reader quit (`./lc.sh run | head`)."""
        self.data.mkdir(exist_ok=True)
        self.count += 1
        log = open(self.data / f"run-{self.count}.log", "wb")  # noqa: SIM115
        read_end, write_end = os.pipe()
        os.close(read_end)
        with log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "llamacontroller_site.runner"], cwd=REPO, env=self.env,
                stdout=write_end if reader_gone else log, stderr=log, start_new_session=True,
            )  # fmt: skip
        os.close(write_end)
        return proc

    def log(self, n: int = 1) -> str:
        return (self.data / f"run-{n}.log").read_text(errors="replace")

    def wait_ready(self, proc: subprocess.Popen) -> None:
        """Until the worker holds the host name and reported ready."""

        def ready():
            assert proc.poll() is None, f"the run command exited ({proc.returncode}):\n{self.log()[-3000:]}"
            log = self.log()  # gunicorn's and celery's lines: on standard error
            return (
                f"Listening at: http://127.0.0.1:{self.port}" in log
                and f"{self.host}@" in log
                and " ready." in log
            )

        wait_until(ready, START_TIMEOUT, "the run command to start")

    def manage(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "llamacontroller_site.runner", "manage", *args], cwd=REPO, env=self.env,
            capture_output=True, text=True, timeout=timeout,
        )  # fmt: skip

    def load(self) -> dict:
        result = self.manage("load", "tiny-test-llama", "--gpu", "0", "--wait")
        assert result.returncode == 0, result.stdout + result.stderr
        (instance,) = self.instances()
        assert instance["status"] == "running" and psutil.pid_exists(instance["pid"])
        return instance

    def query(self, sql: str) -> list[dict]:
        with sqlite3.connect(self.data / "db.sqlite3", timeout=10) as db:
            db.row_factory = sqlite3.Row
            return [dict(row) for row in db.execute(sql)]

    def instances(self) -> list[dict]:
        return self.query("SELECT id, status, pid, exit_code, error FROM models_app_gpuinstance ORDER BY id")

    def events(self, instance_id: int) -> list[str]:
        rows = self.query(f"SELECT kind FROM models_app_instanceevent WHERE instance_id = {instance_id:d}")
        return [row["kind"] for row in rows]

    def leftovers(self) -> list[str]:
        """Live processes that carry the data folder: the run's children and llama-servers."""
        mark, found = str(self.data), []
        for proc in psutil.process_iter(["pid", "cmdline", "status"]):
            try:
                if proc.pid == os.getpid() or proc.info["status"] == psutil.STATUS_ZOMBIE:
                    continue
                carried = " ".join(proc.info["cmdline"] or []) + " " + " ".join(proc.environ().values())
            except psutil.Error:
                continue
            if mark in carried:
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])[:120]}")
        return found

    def kill_all(self) -> None:
        for line in self.leftovers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(line.split()[0]), signal.SIGKILL)


@pytest.fixture
def run(tmp_path, llama_server_path):
    run = Run(tmp_path, llama_server_path)
    yield run
    run.kill_all()


def test_second_run_is_refused_and_a_killed_runner_leaves_nothing(run):
    """A second run in the same folder is refused before it does anything and the first one's model keeps
    running; then the first runner is killed with SIGKILL: its children die with it and the watchdog stops
    and records the llama-server. The first one's output goes nowhere (its reader quit): it runs on."""
    first = run.start(reader_gone=True)  # and nobody reads its output (`./lc.sh run | head`)
    run.wait_ready(first)
    instance = run.load()

    second = run.start()
    assert second.wait(60) == 1
    refusal = run.log(2)
    assert refusal.startswith("[llamacontroller] refusing to start: another ./lc.sh run")
    assert refusal.count("\n") == 1, refusal
    assert run.instances() == [instance] and psutil.pid_exists(instance["pid"])
    assert "unload_requested" not in run.events(instance["id"])
    assert first.poll() is None and redis.Redis.from_url((run.data / "embedded-redis.url").read_text()).ping()

    os.kill(first.pid, signal.SIGKILL)
    first.wait()
    wait_until(lambda: not run.leftovers(), 90, "every process of the killed run to end")
    (after,) = run.instances()
    assert after["status"] == "stopped", after
    assert "ended without stopping its models" in (run.data / "watchdog.log").read_text()
    assert not (run.data / "embedded-redis.url").exists()
    # Free for the next run: the watchdog held the lock while it worked and lets it go as it exits, which under
    # load can come a moment after the last process carrying the data folder ended.
    wait_until(lambda: _lock_is_free(run.data), 30, "the watchdog to let the data folder's lock go")


def _lock_is_free(data) -> bool:
    try:
        lock_data_folder(data).close()
    except AlreadyRunning:
        return False
    return True


def test_killed_redis_is_restarted_and_a_hang_up_records_a_killed_model_as_crashed(run):
    """The embedded Redis killed: restarted on the same port with the same password, and the queue works
    again (a load goes through). A llama-server killed, then SIGHUP (the terminal closed): everything stops,
    and the instance is `crashed` with exit code -9, not `unloaded`."""
    proc = run.start()
    run.wait_ready(proc)
    url = (run.data / "embedded-redis.url").read_text()
    port = int((run.data / "embedded-redis.port").read_text())
    (valkey,) = [p for p in psutil.Process(proc.pid).children() if "valkey" in p.name()]
    valkey.kill()
    wait_until(lambda: f"restarting it on port {port}" in run.log(), 30, "the embedded Redis to be restarted")

    def answers():
        try:
            return redis.Redis.from_url(url).ping()
        except redis.ConnectionError:
            return False

    wait_until(answers, 30, "the restarted Redis to answer on its port, with its password")

    instance = run.load()  # through the restarted broker
    os.kill(instance["pid"], signal.SIGKILL)
    time.sleep(1)  # the worker's reaper writes the exit code to the instance log
    proc.send_signal(signal.SIGHUP)
    assert proc.wait(90) == 0
    assert not run.leftovers()
    (after,) = run.instances()
    assert (after["status"], after["exit_code"]) == ("crashed", -9), after
    assert "unloaded" not in run.events(instance["id"])
    assert "[llamacontroller] stopped" in run.log()


def test_a_worker_that_dies_is_started_again_and_takes_its_running_model_over(run):
    """Celery's worker can die on a broker loss (kombu restoring unacknowledged messages on a dead
    connection: "Unrecoverable error: AttributeError"), here it is killed: the run command starts it again
    instead of stopping everything; the model loaded before keeps running, the new worker holds the host
    name, an unload goes through it, and Ctrl-C still stops everything."""
    proc = run.start()
    run.wait_ready(proc)
    instance = run.load()
    (worker,) = [
        p
        for p in psutil.Process(proc.pid).children()
        if p.cmdline()[2:5] == ["celery", "-A", "llamacontroller_site"] and "worker" in p.cmdline()
    ]
    worker.kill()
    wait_until(
        lambda: "worker exited with code -9: starting it again" in run.log(), 30, "the worker's restart"
    )
    wait_until(lambda: run.log().count(" ready.") >= 2, 90, "the new worker to be ready")
    assert proc.poll() is None
    (after,) = run.instances()
    assert (after["status"], after["pid"]) == ("running", instance["pid"]) and psutil.pid_exists(
        instance["pid"]
    )
    holder = run.query("SELECT worker_pid FROM gpus_host")[0]["worker_pid"]
    assert holder != worker.pid and psutil.pid_exists(holder)

    result = run.manage("unload", str(instance["id"]), "--wait")
    assert result.returncode == 0, result.stdout + result.stderr + run.log()[-3000:]
    (after,) = run.instances()
    assert after["status"] == "stopped" and not psutil.pid_exists(instance["pid"])
    proc.send_signal(signal.SIGINT)
    assert proc.wait(90) == 0
    assert not run.leftovers()
    assert "[llamacontroller] stopped" in run.log()
