"""Kill orphan kills only an orphan llama-server (issue 17, item 3): a process that the GPU's latest
telemetry lists as an orphan there, whose executable is one of the host's registered llama-server binaries,
checked again by the worker right before the kill. Real processes: copies of `sleep`, one registered as the
host's llama-server, one merely named `llama-server-decoy` (which was killed before)."""

import contextlib
import os
import shutil
import signal
import subprocess
import time

import psutil
import pytest
from django.urls import reverse

from gpus.models import Gpu
from models_app import orphans
from models_app.memory import refresh_host_memory
from models_app.models import InstanceEvent, LlamaBinary

pytestmark = pytest.mark.django_db


@pytest.fixture
def start(tmp_path):
    """`start(name, gpu_uuid)`: a copy of sleep under that name, 'on' that fake GPU (or on none); its pid."""
    children: list[subprocess.Popen] = []

    def run(name: str, gpu_uuid: str | None) -> int:
        path = tmp_path / "bin" / name
        path.parent.mkdir(exist_ok=True)
        if not path.exists():
            shutil.copy(shutil.which("sleep"), path)
        env = {"PATH": "/usr/bin:/bin", **({"CUDA_VISIBLE_DEVICES": gpu_uuid} if gpu_uuid else {})}
        child = subprocess.Popen([str(path), "60"], env=env, start_new_session=True)
        children.append(child)
        # Popen returns after the fork, maybe before the exec: until then the child is a copy of this
        # process, with this process's executable and environment, and the telemetry would see that.
        deadline = time.monotonic() + 10
        while _exe(child.pid) != str(path) and time.monotonic() < deadline:
            time.sleep(0.002)
        return child.pid

    yield run
    for child in children:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
        child.wait(5)


@pytest.fixture
def scene(fake_gpus, start, tmp_path):
    """GPU 0: a decoy named llama-server-decoy. GPU 1: a real orphan (the host's registered llama-server,
    owned by no instance). Nowhere: another decoy. The telemetry refreshed once."""
    LlamaBinary.objects.create(
        host=fake_gpus.host, name="default", path=str(tmp_path / "bin" / "llama-server")
    )
    gpu0, gpu1 = fake_gpus.gpus
    pids = {
        "decoy": start("llama-server-decoy", gpu0.uuid),
        "orphan": start("llama-server", gpu1.uuid),
        "nowhere": start("llama-server-decoy", None),
    }
    refresh_host_memory(fake_gpus.host.name)
    gpu0.refresh_from_db()
    gpu1.refresh_from_db()
    return gpu0, gpu1, pids


def _exe(pid: int) -> str | None:
    try:
        return psutil.Process(pid).exe()
    except psutil.Error:
        return None


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def owners(gpu) -> dict[int, str]:
    return {p["pid"]: p["owner"] for p in gpu.processes}


def test_the_telemetry_calls_only_a_registered_binary_an_orphan(scene):
    gpu0, gpu1, pids = scene
    assert owners(gpu0)[pids["decoy"]] == "foreign"
    assert owners(gpu1)[pids["orphan"]] == "orphan"


def kill(client, gpu, pid):
    return client.post(reverse("orphan-kill-api", args=[gpu.pk, pid]))


def test_the_api_refuses_what_the_telemetry_does_not_list_as_an_orphan_there(client, users, scene, sent):
    gpu0, gpu1, pids = scene
    client.force_login(users["admin"])
    response = kill(client, gpu0, pids["decoy"])
    assert response.status_code == 409, response.content
    assert "is not running one of the host's llama-server binaries" in response.json()["detail"]
    response = kill(client, gpu0, pids["nowhere"])  # the decoy: on no GPU
    assert response.status_code == 404
    assert (
        f"pid {pids['nowhere']} is not among the processes on GPU 0 of testhost" in response.json()["detail"]
    )
    assert kill(client, gpu0, pids["orphan"]).status_code == 404  # an orphan, but on GPU 1
    assert sent == [] and alive(pids["decoy"]) and alive(pids["nowhere"])

    assert kill(client, gpu1, pids["orphan"]).status_code == 202
    assert sent == [
        ("kill_orphan", ["testhost", pids["orphan"], users["admin"].pk, gpu1.pk], {"queue": "host.testhost"})
    ]


def test_an_instances_process_is_refused_too(client, users, scene, sent):
    gpu0, _, pids = scene
    Gpu.objects.filter(pk=gpu0.pk).update(
        processes=[
            {"pid": 999999, "name": "llama-server", "used_mib": 1, "owner": "instance", "instance_id": 7}
        ]
    )
    client.force_login(users["admin"])
    response = kill(client, Gpu.objects.get(pk=gpu0.pk), 999999)
    assert response.status_code == 409 and "belongs to instance #7" in response.json()["detail"]


def test_the_worker_checks_again_before_it_kills(scene, users, monkeypatch):
    gpu0, gpu1, pids = scene
    host = gpu0.host
    # Telemetry that calls the decoy an orphan (stale, or forged in the database): the worker reads it
    # afresh, and the decoy stays.
    listed = {
        "pid": pids["decoy"],
        "name": "llama-server-decoy",
        "used_mib": 1,
        "owner": "orphan",
        "instance_id": None,
    }
    Gpu.objects.filter(pk=gpu0.pk).update(processes=[listed])
    message = orphans.kill_orphan(host, pids["decoy"], actor=users["admin"], gpu_id=gpu0.pk)
    assert "left alone" in message and alive(pids["decoy"])
    # Even if that fresh reading said orphan, the executable decides.
    monkeypatch.setattr(orphans, "refresh_memory", lambda host_name: None)
    message = orphans.kill_orphan(host, pids["decoy"], actor=users["admin"], gpu_id=gpu0.pk)
    assert "not running one of the host's llama-server binaries" in message and alive(pids["decoy"])
    assert not InstanceEvent.objects.filter(kind=InstanceEvent.Kind.ORPHAN_KILLED).exists()


def test_the_worker_leaves_a_pid_that_became_another_process(scene, users, monkeypatch):
    _, gpu1, pids = scene
    monkeypatch.setattr(orphans, "create_time_of", lambda pid: 1.0)  # as if the pid was reused meanwhile
    message = orphans.kill_orphan(gpu1.host, pids["orphan"], actor=users["admin"], gpu_id=gpu1.pk)
    assert "is another process since it was checked" in message and alive(pids["orphan"])


def test_the_worker_kills_a_real_orphan(scene, users):
    gpu0, gpu1, pids = scene
    assert "left alone" in orphans.kill_orphan(gpu1.host, pids["orphan"], gpu_id=gpu0.pk)  # not on GPU 0
    message = orphans.kill_orphan(gpu1.host, pids["orphan"], actor=users["admin"], gpu_id=gpu1.pk)
    assert message.startswith(f"killed orphan pid {pids['orphan']} on testhost"), message
    assert not alive(pids["orphan"]) and alive(pids["decoy"])
    event = InstanceEvent.objects.get(kind=InstanceEvent.Kind.ORPHAN_KILLED)
    assert event.actor_name == "admin"
