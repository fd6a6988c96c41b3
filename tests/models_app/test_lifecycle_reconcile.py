"""Reconcile: crashes, restarts, lost work, adoption and orphans, with real (stand-in) processes."""

import os
import sys
import time
from datetime import timedelta

import pytest
from django.utils import timezone

from models_app import hosts, launch, orphans, processes, reconcile, stop
from models_app.models import GpuInstance, InstanceEvent, LlamaBinary
from models_app.services import request_load

Status = GpuInstance.Status
Kind = InstanceEvent.Kind


@pytest.fixture
def run(django_capture_on_commit_callbacks):
    """One reconcile pass, with what it queues on commit actually sent (to the `sent` fixture)."""

    def run_once():
        with django_capture_on_commit_callbacks(execute=True):
            return reconcile.reconcile_host("testhost")

    return run_once


def _age(instance, seconds=60):
    """Make the instance's history look old (its events are what reconcile dates it by)."""
    then = timezone.now() - timedelta(seconds=seconds)
    instance.events.update(created_at=then)


def _wait_dead(instance, timeout=15):
    deadline = time.monotonic() + timeout
    while processes.is_alive(instance.pid, instance.process_create_time) and time.monotonic() < deadline:
        time.sleep(0.02)
    # and the reaper thread has appended the exit code
    while processes.exit_code_of(instance.pid, instance.log_path) is None and time.monotonic() < deadline:
        time.sleep(0.02)


def _running(fake_gpus, argv, tmp_path, reap, **fields):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    log = launch.log_path_for(instance)
    env = launch.instance_env(instance, [fake_gpus.gpus[0].uuid], log)
    pid, create_time = processes.launch(argv, env=env, log_path=log)
    reap.append(pid)
    GpuInstance.objects.filter(pk=instance.pk).update(
        status=Status.RUNNING,
        pid=pid,
        process_create_time=create_time,
        log_path=str(log),
        port=8999,
        **fields,
    )
    instance.refresh_from_db()
    return instance


def test_lifecycle_crash_is_noticed_with_exit_code_and_log(run, fake_gpus, tiny_model, tmp_path, reap, sent):
    script = "print('model loaded', flush=True); import time; time.sleep(0.3); print('ggml: out of memory'); exit(134)"
    instance = _running(fake_gpus, [sys.executable, "-c", script], tmp_path, reap)
    assert run() == {}  # alive: nothing to do
    _wait_dead(instance)
    assert run() == {"crashed": 1}
    instance.refresh_from_db()
    assert instance.status == Status.CRASHED
    assert instance.exit_code == 134
    assert "exited unexpectedly with code 134" in instance.error
    assert "out of memory" in instance.error
    assert not instance.gpu_links.filter(active=True).exists()
    assert instance.events.filter(kind=Kind.CRASHED, actor_name="system").exists()
    assert sent == []  # no restart unless the model asks for it


def test_lifecycle_restart_on_crash_with_backoff(run, fake_gpus, tiny_model, tmp_path, reap, sent):
    tiny_model.restart_on_crash, tiny_model.max_restarts = True, 2
    tiny_model.save()
    instance = _running(fake_gpus, [sys.executable, "-c", "exit(1)"], tmp_path, reap, restart_count=1)
    _wait_dead(instance)
    run()
    instance.refresh_from_db()
    assert instance.status == Status.PENDING
    assert instance.restart_count == 2
    assert instance.gpu_links.get().active  # the GPU is claimed again
    assert sent == [("load_model", [instance.pk], {"queue": "host.testhost", "countdown": 4})]
    # At the limit it stays crashed.
    GpuInstance.objects.filter(pk=instance.pk).update(status=Status.RUNNING)
    run()
    instance.refresh_from_db()
    assert instance.status == Status.CRASHED
    assert instance.events.filter(detail__contains="not restarted: 2 restarts").exists()


def test_lifecycle_lost_pending_is_resent(
    run, fake_gpus, tiny_model, sent, django_capture_on_commit_callbacks
):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    assert run() == {}  # just requested: its task is on the way
    _age(instance)
    assert run() == {}  # the host's own pass leaves resends to beat (models_app/hosts.py)
    with django_capture_on_commit_callbacks(execute=True):
        assert hosts.check_hosts() == {"resent": 1}
    assert sent == [("load_model", [instance.pk], {"queue": "host.testhost"})]


def test_lifecycle_lost_start_is_started_again(run, fake_gpus, tiny_model, sent):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    GpuInstance.objects.filter(pk=instance.pk).update(status=Status.STARTING)
    _age(instance)
    assert run() == {"reloaded": 1}
    instance.refresh_from_db()
    assert instance.status == Status.PENDING
    assert instance.gpu_links.get().active
    assert sent[0][:2] == ("load_model", [instance.pk])


def test_lifecycle_started_but_unrecorded_process_is_adopted(
    run, fake_gpus, tiny_model, fake_llama, tmp_path, reap, sent
):
    """The worker died between starting llama-server and recording its pid: found by its tag."""
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    GpuInstance.objects.filter(pk=instance.pk).update(status=Status.STARTING, lease_expires_at=timezone.now())
    log = launch.log_path_for(instance)
    pid, _ = processes.launch(
        [fake_llama, "60"], env=launch.instance_env(instance, [fake_gpus.gpus[0].uuid], log), log_path=log
    )
    reap.append(pid)
    assert run() == {"adopted": 1}
    instance.refresh_from_db()
    assert instance.pid == pid
    assert sent[0][:2] == ("resume_start", [instance.pk])
    assert instance.events.filter(kind=Kind.ADOPTED).exists()


def test_lifecycle_orphans_found_and_killed(fake_gpus, tiny_model, fake_llama, tmp_path, reap, users):
    # One tagged for an instance that has stopped, one untagged on our GPU, one owned by a running instance.
    stopped = request_load(model_id="tiny", gpu_spec="1", actor=None)
    GpuInstance.objects.filter(pk=stopped.pk).update(status=Status.STOPPED)
    stopped.gpu_links.update(active=False)
    log = launch.log_path_for(stopped)
    tagged, _ = processes.launch(
        [fake_llama, "60"], env=launch.instance_env(stopped, [fake_gpus.gpus[1].uuid], log), log_path=log
    )
    untagged, _ = processes.launch(
        [fake_llama, "60"], env={**os.environ, "CUDA_VISIBLE_DEVICES": fake_gpus.gpus[1].uuid}, log_path=log
    )
    owned = _running(fake_gpus, [fake_llama, "60"], tmp_path, reap)
    reap.extend([tagged, untagged])

    found = {o["pid"]: o for o in orphans.find_orphans(fake_gpus.host)}
    assert set(found) == {tagged, untagged}
    assert found[tagged]["instance_id"] == stopped.pk
    assert found[untagged]["gpus"] == [1]

    assert "belongs to instance #" in orphans.kill_orphan(fake_gpus.host, owned.pid, actor=users["admin"])
    assert processes.is_alive(owned.pid, owned.process_create_time)
    assert "left alone" in orphans.kill_orphan(fake_gpus.host, os.getpid())  # on no GPU
    # An orphan runs one of the host's llama-server binaries (tests/gpus/test_kill_orphan.py).
    LlamaBinary.objects.create(host=fake_gpus.host, name="stand-in", path=fake_llama)
    message = orphans.kill_orphan(fake_gpus.host, untagged, actor=users["admin"])
    assert message.startswith(f"killed orphan pid {untagged}")
    assert not processes.is_alive(untagged, None)
    event = InstanceEvent.objects.get(kind=Kind.ORPHAN_KILLED)
    assert (event.actor_name, event.instance) == ("admin", None)


@pytest.mark.parametrize("status", [Status.RUNNING, Status.STARTING])
def test_lifecycle_unload_finds_unrecorded_process(fake_gpus, tiny_model, fake_llama, reap, status):
    """An unload racing a start still stops the process, found by its tag."""
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    GpuInstance.objects.filter(pk=instance.pk).update(status=status)
    log = launch.log_path_for(instance)
    pid, create_time = processes.launch(
        [fake_llama, "60"], env=launch.instance_env(instance, [fake_gpus.gpus[0].uuid], log), log_path=log
    )
    reap.append(pid)
    stop.unload_instance(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.STOPPED
    assert not processes.is_alive(pid, create_time)
