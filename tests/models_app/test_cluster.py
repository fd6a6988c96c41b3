"""One worker per host name, the heartbeat, and what a host's return does to its unknown instances."""

import subprocess
import sys
from datetime import UTC, datetime, timedelta

import psutil
import pytest
from django.utils import timezone

from gpus.models import Host
from models_app import cluster, reconcile
from models_app.models import GpuInstance, InstanceEvent
from models_app.services import request_load

Status = GpuInstance.Status
Kind = InstanceEvent.Kind


@pytest.fixture
def sleeper():
    """A real process to stand for a live worker or a llama-server that outlived its host's silence."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    yield proc
    proc.kill()
    proc.wait()


def _identity(proc=None, machine="machine-a", host="box-a") -> cluster.WorkerIdentity:
    pid = proc.pid if proc is not None else 999_999
    created = psutil.Process(pid).create_time() if proc is not None else 1.0
    return cluster.WorkerIdentity(
        machine_id=machine, hostname=host, pid=pid, started_at=datetime.fromtimestamp(created, tz=UTC)
    )


def _me(machine="machine-a") -> cluster.WorkerIdentity:
    return cluster.WorkerIdentity(
        machine_id=machine, hostname="me", pid=123_456_789, started_at=timezone.now()
    )


def test_first_worker_claims_the_name_and_records_itself(db, settings):
    settings.LLAMA_SERVER_HOST = "127.0.0.1"
    host = cluster.claim("box", _me())
    host.refresh_from_db()
    assert (host.worker_machine_id, host.worker_pid, host.address) == ("machine-a", 123_456_789, "127.0.0.1")
    assert host.is_up


def test_a_second_worker_on_this_machine_is_refused_while_the_first_runs(db, sleeper):
    cluster.claim("box", _identity(sleeper))
    with pytest.raises(cluster.HostNameTaken) as taken:
        cluster.claim("box", _me())
    message = str(taken.value)
    assert f"host name 'box' is held by another worker: pid {sleeper.pid} on box-a (this machine)" in message
    assert "LLAMACONTROLLER_HOST_NAME" in message
    assert Host.objects.get(name="box").worker_pid == sleeper.pid  # nothing changed


def test_a_killed_worker_is_replaced_at_once_on_the_same_machine(db, sleeper):
    cluster.claim("box", _identity(sleeper))
    sleeper.kill()
    sleeper.wait()
    host = cluster.claim("box", _me())  # its heartbeat is fresh, but its process is gone
    assert host.worker_pid == 123_456_789


def test_a_reused_pid_does_not_count_as_the_old_worker(db, sleeper):
    holder = _identity(sleeper)
    cluster.claim("box", holder)
    Host.objects.filter(name="box").update(worker_started_at=holder.started_at - timedelta(hours=1))
    assert cluster.claim("box", _me()).worker_pid == 123_456_789


def test_a_worker_on_another_machine_waits_for_the_timeout(db, settings):
    settings.HOST_TIMEOUT_SECONDS = 30
    cluster.claim("box", _identity(machine="machine-b", host="box-b"))
    with pytest.raises(
        cluster.HostNameTaken, match=r"pid 999999 on box-b \(machine machine-b\) sent a heartbeat"
    ):
        cluster.claim("box", _me())
    Host.objects.filter(name="box").update(last_seen=timezone.now() - timedelta(seconds=31))
    host = cluster.claim("box", _me())
    assert host.worker_machine_id == "machine-a"
    assert InstanceEvent.objects.filter(
        kind=Kind.HOST_RETURNED, detail__startswith="host box answers again"
    ).exists()


def test_heartbeat_stops_a_worker_whose_name_was_taken(db):
    me = _me()
    cluster.claim("box", me)
    assert cluster.heartbeat("box", me) is True
    Host.objects.filter(name="box").update(worker_pid=1)
    assert cluster.heartbeat("box", me) is False


def test_heartbeat_after_a_silence_records_the_return_and_reconciles_now(db, sent, settings):
    me = _me()
    cluster.claim("box", me)
    Host.objects.filter(name="box").update(last_seen=timezone.now() - timedelta(seconds=600))
    assert cluster.heartbeat("box", me) is True
    assert Host.objects.get(name="box").is_up
    assert InstanceEvent.objects.filter(kind=Kind.HOST_RETURNED).count() == 1
    assert ("reconcile_host", ["box"], {"queue": "host.box"}) in sent


def test_address_is_the_bind_address_or_the_configured_one(settings):
    settings.LLAMA_SERVER_HOST = "10.0.0.7"
    assert cluster.host_address() == "10.0.0.7"
    settings.LLAMA_SERVER_HOST = "0.0.0.0"
    settings.HOST_ADDRESS = "gpu-box-2.lan"
    assert cluster.host_address() == "gpu-box-2.lan"


# --- the host returns ---------------------------------------------------------------------------------


def _unknown(fake_gpus, tiny_model, *, pid, create_time, loaded=True) -> GpuInstance:
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    GpuInstance.objects.filter(pk=instance.pk).update(
        status=Status.UNKNOWN,
        pid=pid,
        process_create_time=create_time,
        port=9999,
        loaded_at=timezone.now() if loaded else None,
    )
    instance.refresh_from_db()
    return instance


def test_an_unknown_instance_whose_process_outlived_the_silence_runs_again(
    fake_gpus, tiny_model, sent, sleeper
):
    instance = _unknown(
        fake_gpus, tiny_model, pid=sleeper.pid, create_time=psutil.Process(sleeper.pid).create_time()
    )
    assert reconcile.reconcile_host("testhost").get("adopted") == 1
    instance.refresh_from_db()
    assert (instance.status, instance.pid) == (Status.RUNNING, sleeper.pid)
    assert instance.events.filter(kind=Kind.ADOPTED, detail__contains="outlived the silence").exists()
    assert sleeper.poll() is None  # not restarted, not killed


def test_an_unknown_instance_whose_process_died_is_crashed(fake_gpus, tiny_model, sent, sleeper):
    created = psutil.Process(sleeper.pid).create_time()
    sleeper.kill()
    sleeper.wait()
    instance = _unknown(fake_gpus, tiny_model, pid=sleeper.pid, create_time=created)
    assert reconcile.reconcile_host("testhost").get("crashed") == 1
    instance.refresh_from_db()
    assert instance.status == Status.CRASHED
    assert not instance.gpu_links.filter(active=True).exists()


def test_an_unknown_start_whose_process_died_fails(fake_gpus, tiny_model, sent):
    instance = _unknown(fake_gpus, tiny_model, pid=999_999, create_time=1.0, loaded=False)
    assert reconcile.reconcile_host("testhost").get("failed") == 1
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert "loading when its host went down" in instance.error


def test_an_unknown_start_that_still_runs_is_watched_again(fake_gpus, tiny_model, sent, sleeper):
    instance = _unknown(
        fake_gpus,
        tiny_model,
        pid=sleeper.pid,
        create_time=psutil.Process(sleeper.pid).create_time(),
        loaded=False,
    )
    reconcile.reconcile_host("testhost")
    instance.refresh_from_db()
    assert instance.status == Status.STARTING
