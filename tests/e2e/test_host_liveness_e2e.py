"""A real worker whose broker dies (issue 16, item 6), with a real Redis of its own that the test kills with
SIGKILL: the worker process stays up, retrying the dead address, but it writes no more heartbeats, so its
host goes down within the host timeout and the load that waited for it fails with the host named (seen
before: the host said `up` and the load stayed `pending` for 5 min 33 s). When Redis is back on the same
port, heartbeats resume and the host is up again."""

import signal
import subprocess
import sys
import time

import pytest
from django.utils import timezone

from gpus.models import Host
from llamacontroller_site.embedded_redis import EmbeddedRedis
from models_app import hosts
from models_app.models import GpuInstance
from models_app.services import request_load
from tests.conftest import HOST_NAME, REPO, worker_env

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Status = GpuInstance.Status
TIMEOUT = 3  # LLAMACONTROLLER_HOST_TIMEOUT_SECONDS, three heartbeats of 1 s


def _wait(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return time.monotonic()
        time.sleep(0.1)
    raise AssertionError(f"{what} not within {timeout}s")


def _last_seen():
    return Host.objects.filter(name=HOST_NAME).values_list("last_seen", flat=True).first()


@pytest.fixture
def own_broker(tmp_path):
    redis = EmbeddedRedis(log_file=tmp_path / "redis.log").start()
    yield redis
    redis.stop()


@pytest.fixture
def worker_on(own_broker, fake_gpus, settings, tmp_path):
    """A host worker on its own broker, heartbeating every second."""
    settings.HOST_HEARTBEAT_SECONDS, settings.HOST_TIMEOUT_SECONDS = 1, TIMEOUT
    env = worker_env(
        REDIS_URL=own_broker.url,
        LLAMACONTROLLER_HOST_HEARTBEAT_SECONDS=1,
        LLAMACONTROLLER_HOST_TIMEOUT_SECONDS=TIMEOUT,
    )
    argv = [
        sys.executable, "-m", "celery", "-A", "llamacontroller_site", "worker", "-Q", f"host.{HOST_NAME}",
        "-n", f"liveness-{time.monotonic_ns()}@%h", "-c", "1", "-l", "INFO", "--without-gossip",
        "--without-mingle",
    ]  # fmt: skip
    log = open(tmp_path / "worker.log", "ab")  # noqa: SIM115
    worker = subprocess.Popen(
        argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    worker.log_path = tmp_path / "worker.log"
    yield worker
    if worker.poll() is None:
        worker.send_signal(signal.SIGTERM)
        try:
            worker.wait(15)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
    log.close()
    print((tmp_path / "worker.log").read_text(errors="replace")[-3000:])


def test_a_worker_that_lost_its_broker_is_down_and_its_load_fails(worker_on, own_broker, tiny_model):
    # Up: claimed, then heartbeats keep coming after the start (each one proven through the broker).
    _wait(lambda: " ready." in worker_on.log_path.read_text(errors="replace"), 60, "the worker")
    for _ in range(2):  # writes after the start's own ones: the heartbeat thread's
        seen = _last_seen()
        _wait(lambda seen=seen: _last_seen() > seen, 10, "a heartbeat")
    assert Host.objects.get(name=HOST_NAME).is_up
    # A load its worker will never see (it is queued on the test's broker, which that worker does not read).
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)

    own_broker.process.kill()  # SIGKILL, as in the issue
    own_broker.process.wait()
    killed = time.monotonic()
    down_at = _wait(lambda: not Host.objects.get(name=HOST_NAME).is_up, TIMEOUT + 10, "the host down")
    assert worker_on.poll() is None  # the worker process is alive, retrying: it just cannot take work
    print(f"host down {down_at - killed:.1f}s after its broker died")

    # Beat on the default queue gives the load up, naming the host.
    def failed():
        hosts.check_hosts()
        return GpuInstance.objects.get(pk=instance.pk).status == Status.FAILED

    _wait(failed, TIMEOUT + 10, "the load failed")
    instance.refresh_from_db()
    assert f"host {HOST_NAME}" in instance.error, instance.error

    # The broker comes back on the same port: the worker reconnects and the host is up again.
    own_broker.process = EmbeddedRedis(password=own_broker.password, port=own_broker.port).start().process
    back = timezone.now()
    _wait(lambda: (_last_seen() or back) > back, 60, "heartbeats after the broker returned")
    assert Host.objects.get(name=HOST_NAME).is_up
