"""A real cluster on one machine: the test database (PostgreSQL in CI's second pass), the test Redis, the web
app as `./lc.sh run` serves it, celery beat, a worker for the default queue (the web node's) and two GPU
hosts, `box-a` and `box-b`: each a real worker with its own LLAMACONTROLLER_HOST_NAME, its own simulated
GPUs and port range, starting the real llama-server with the tiny model. Everything goes through the REST
API with a token. Timings are short so that the test is quick: heartbeat 1 s, host timeout 4 s."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psutil
import pytest

from accounts.models import ApiToken
from gateway.models import UsageRecord
from gpus.models import Gpu, Host
from llamacontroller_site.embedded_redis import free_port
from llamacontroller_site.runner import web_command
from models_app import processes
from models_app.models import GpuInstance, InstanceEvent
from tests.conftest import REPO, kill_test_processes, purge_queues, worker_env
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Status = GpuInstance.Status
HEARTBEAT_SECONDS = 1
HOST_TIMEOUT_SECONDS = 4
HOSTS = {"box-a": "9300-9309", "box-b": "9310-9319"}
# box-b's llama-servers listen on every address and the web node reaches them at 127.0.0.2 (a server bound
# to 127.0.0.1, as box-a's are, does not answer there): the gateway must use the address the host reports.
HOST_ENV = {
    "box-a": {},
    "box-b": {"LLAMACONTROLLER_LLAMA_SERVER_HOST": "0.0.0.0", "LLAMACONTROLLER_HOST_ADDRESS": "127.0.0.2"},
}


def fake_gpu_file(path: Path, host: str) -> str:
    gpus = [
        {
            "index": i,
            "uuid": f"GPU-{host}-0000-0000-0000-00000000000{i}",
            "name": f"Simulated GPU of {host}",
            "memory_total_mib": 24564,
            "baseline_used_mib": 10,
            "foreign_processes": [],
        }
        for i in range(2)
    ]
    path.write_text(json.dumps({"gpus": gpus, "fail": None, "hang_seconds": 0}))
    return str(path)


class Cluster:
    """The processes of the cluster; each one's output in its own log file."""

    def __init__(self, tmp_path: Path, llama_server: str):
        self.tmp = tmp_path
        self.llama_server = llama_server
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {
            "LLAMACONTROLLER_HOST_HEARTBEAT_SECONDS": HEARTBEAT_SECONDS,
            "LLAMACONTROLLER_HOST_TIMEOUT_SECONDS": HOST_TIMEOUT_SECONDS,
            "LLAMACONTROLLER_LLAMA_SERVER": llama_server,
        }

    def _spawn(self, name: str, argv: list[str], **env) -> subprocess.Popen:
        log = open(self.tmp / f"{name}.log", "ab")  # noqa: SIM115
        proc = subprocess.Popen(
            argv, cwd=REPO, env=worker_env(**self.env, **env), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-4000:]

    def worker(self, host: str, name: str | None = None) -> subprocess.Popen:
        """A GPU host's worker: its own host name, simulated GPUs and port range."""
        return self._spawn(
            name or host,
            [sys.executable, "-m", "celery", "-A", "llamacontroller_site", "worker", "-Q", f"host.{host}",
             "-n", f"{host}@%h", "-c", "2", "-l", "INFO", "--without-gossip", "--without-mingle"],
            LLAMACONTROLLER_HOST_NAME=host,
            LLAMACONTROLLER_FAKE_GPUS=fake_gpu_file(self.tmp / f"gpus-{host}.json", host),
            LLAMACONTROLLER_PORT_RANGE=HOSTS[host],
            **HOST_ENV[host],
        )  # fmt: skip

    def start(self) -> str:
        """Web, beat, the default queue's worker and both hosts' workers; the web app's base URL."""
        self._spawn(
            "default",
            [sys.executable, "-m", "celery", "-A", "llamacontroller_site", "worker", "-Q", "default",
             "-n", "web-node@%h", "-c", "1", "-l", "INFO", "--without-gossip", "--without-mingle"],
            LLAMACONTROLLER_HOST_NAME="web-node",
        )  # fmt: skip
        self._spawn(
            "beat",
            [sys.executable, "-m", "celery", "-A", "llamacontroller_site", "beat", "-l", "INFO",
             "-s", str(self.tmp / "beat-schedule")],
        )  # fmt: skip
        for host in HOSTS:
            self.worker(host)
        port = free_port()
        self._spawn("web", web_command(Path(sys.executable).parent, bind=f"127.0.0.1:{port}", workers=1))
        url = f"http://127.0.0.1:{port}"

        def web_up():
            for name, proc in self.procs.items():
                assert proc.poll() is None, f"{name} exited ({proc.returncode}):\n{self.log(name)}"
            try:
                return httpx.get(url + "/healthz", timeout=1).status_code in (200, 503)
            except httpx.HTTPError:
                return False

        wait_until(web_up, 60, "the web app")
        wait_until(
            lambda: (
                Gpu.objects.filter(host__name__in=HOSTS).count() == 4
                and Host.objects.up().filter(name__in=HOSTS).count() == 2
            ),
            60,
            "both hosts to register their GPUs",
        )
        return url

    def kill(self, name: str) -> int:
        """kill -9 a process and its pool (never the llama-servers: they have their own session)."""
        proc = self.procs[name]
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return proc.pid

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs.values():
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def cluster(transactional_db, tiny_model, llama_server_path, tmp_path, settings):
    settings.HOST_TIMEOUT_SECONDS = HOST_TIMEOUT_SECONDS
    settings.HOST_HEARTBEAT_SECONDS = HEARTBEAT_SECONDS
    settings.RECONCILE_SECONDS = 2
    settings.GPU_REFRESH_SECONDS = 2
    settings.FAKE_GPUS_FILE = fake_gpu_file(tmp_path / "gpus-test.json", "test")
    settings.GPU_BACKEND = "fake"
    purge_queues("default", *(f"host.{h}" for h in HOSTS))
    running = Cluster(tmp_path, str(llama_server_path))
    try:
        yield running, running.start()
    finally:
        running.stop()
        kill_test_processes()


@pytest.fixture
def api(cluster, users):
    token = ApiToken.issue(users["admin"], "cluster")[1]
    client = httpx.Client(base_url=cluster[1], headers={"Authorization": f"Bearer {token}"}, timeout=30)
    yield client
    client.close()


def instance_status(api, pk: int) -> dict:
    return api.get(f"/api/v1/instances/{pk}/").json()


def load(api, host: str, gpu: str) -> httpx.Response:
    return api.post("/api/v1/instances/", json={"model_id": "tiny", "gpu_id": gpu, "host": host})


def wait_status(api, pk: int, *statuses: str, timeout=60.0) -> dict:
    return wait_until(
        lambda: (d := instance_status(api, pk))["status"] in statuses and d,
        timeout,
        f"#{pk} to be {statuses}",
    )


def test_cluster_host_dies_and_returns(cluster, api, settings):
    procs, _ = cluster

    # A load on each host, through the web app.
    ids = {}
    for host in HOSTS:
        answer = load(api, host, "0")
        assert answer.status_code == 202, answer.text
        ids[host] = answer.json()["id"]
    for host, pk in ids.items():
        data = wait_status(api, pk, "running", "failed")
        assert data["status"] == "running", data
        assert data["host"] == host
    a = GpuInstance.objects.get(pk=ids["box-a"])
    b = GpuInstance.objects.get(pk=ids["box-b"])
    assert processes.health_status(a.port) == 200 and processes.health_status(b.port) == 200

    # Reaching instances on another host: at the address the host reported, and only with the instance's key.
    assert dict(Host.objects.filter(name__in=HOSTS).values_list("name", "address")) == {
        "box-a": "127.0.0.1",
        "box-b": "127.0.0.2",
    }
    assert httpx.get(f"http://127.0.0.2:{b.port}/v1/models").status_code == 401
    keyed = {"Authorization": f"Bearer {b.api_key}"}
    assert httpx.get(f"http://127.0.0.2:{b.port}/v1/models", headers=keyed).status_code == 200
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.2:{a.port}/health")

    # One worker per host name: a second worker for box-a refuses to start while the first runs.
    second = procs.worker("box-a", name="box-a-second")
    assert second.wait(60) == 78, procs.log("box-a-second")
    assert "refusing to start: host name 'box-a' is held by another worker" in procs.log("box-a-second")
    assert Host.objects.get(name="box-a").worker_pid == procs.procs["box-a"].pid

    # kill -9 box-a's worker: within the timeout the host is down.
    pid_a = a.pid
    killed_at = time.monotonic()
    procs.kill("box-a")
    wait_until(
        lambda: instance_status(api, a.pk)["status"] == "unknown",
        HOST_TIMEOUT_SECONDS + 10,
        "box-a's instance to become unknown",
    )
    down_after = time.monotonic() - killed_at
    gpus_a = list(Gpu.objects.filter(host__name="box-a"))
    assert {g.state for g in gpus_a} == {Gpu.State.UNAVAILABLE}
    assert all(g.state_reason.startswith("host box-a not heard from since") for g in gpus_a)
    assert processes.is_alive(a.pid, a.process_create_time)  # the process outlives its worker

    # Loads and unloads to box-a are refused with 409 naming the host; box-b is unaffected.
    refused = load(api, "box-a", "1")
    assert refused.status_code == 409 and "host box-a is down" in refused.text, refused.text
    refused = api.post(f"/api/v1/instances/{a.pk}/unload/")
    assert refused.status_code == 409 and "host box-a is down" in refused.text, refused.text
    assert instance_status(api, b.pk)["status"] == "running"
    # The gateway answers from box-b (box-a's instance is unknown), through box-b's reported address.
    chat = api.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
    )
    assert chat.status_code == 200, chat.text
    assert UsageRecord.objects.filter(endpoint="/v1/chat/completions").get().instance_id == b.pk
    answer = load(api, "box-b", "1")
    assert answer.status_code == 202, answer.text
    b2 = answer.json()["id"]
    assert wait_status(api, b2, "running", "failed")["status"] == "running"

    # box-a's worker returns: its instance is adopted as it is (same pid), and the host is up again.
    procs.worker("box-a", name="box-a-again")
    data = wait_status(api, a.pk, "running", "crashed", "failed", timeout=60)
    assert data["status"] == "running", data
    a.refresh_from_db()
    assert a.pid == pid_a and processes.health_status(a.port) == 200  # not restarted
    assert a.events.filter(kind=InstanceEvent.Kind.ADOPTED, detail__contains="outlived the silence").exists()
    assert InstanceEvent.objects.filter(
        kind=InstanceEvent.Kind.HOST_RETURNED, detail__startswith="host box-a"
    ).exists()
    wait_until(
        lambda: not Gpu.objects.filter(host__name="box-a", state=Gpu.State.UNAVAILABLE).exists(),
        30,
        "box-a's GPUs to be available again",
    )

    # Everything unloads; no llama-server is left behind.
    for pk in (a.pk, b.pk, b2):
        assert api.post(f"/api/v1/instances/{pk}/unload/").status_code == 202
    for pk in (a.pk, b.pk, b2):
        assert wait_status(api, pk, "stopped", "failed")["status"] == "stopped"
    pids = [GpuInstance.objects.get(pk=pk).pid for pk in (a.pk, b.pk, b2)]
    assert not [
        p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
    ]
    print(f"box-a was down {down_after:.1f} s after its worker was killed (timeout {HOST_TIMEOUT_SECONDS} s)")
