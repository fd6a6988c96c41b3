"""A load in flight when the database goes away (issue 16, item 7): the worker gives the load up but cannot
record why; the reconcile pass that settles the instance later names the cause (the OperationalError), not
"the worker that started it was lost"."""

import socket

import pytest
from django.db import OperationalError
from django.utils import timezone

from models_app import launch, lease, processes, reconcile, stop, tasks
from models_app.models import GpuInstance
from models_app.services import request_load

pytestmark = pytest.mark.django_db(transaction=True)  # the worker's code closes its connection

Status = GpuInstance.Status
OUTAGE = "terminating connection due to administrator command"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_a_load_given_up_while_the_database_is_away_names_the_cause(
    fake_gpus, tiny_model, fake_llama, reap, sent, monkeypatch, django_capture_on_commit_callbacks
):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    log = launch.log_path_for(instance)
    env = launch.instance_env(instance, [fake_gpus.gpus[0].uuid], log)
    pid, create_time = processes.launch([fake_llama, "60"], env=env, log_path=log)  # loads "for ever"
    reap.append(pid)
    GpuInstance.objects.filter(pk=instance.pk).update(
        status=Status.STARTING, pid=pid, process_create_time=create_time, log_path=str(log),
        port=_free_port(), lease_expires_at=lease.lease_until(),
    )  # fmt: skip

    def database_away(*args, **kwargs):
        raise OperationalError(OUTAGE)

    # The worker renews its lease while llama-server loads: the database is gone, and so it stays while the
    # worker tries to record the failure.
    with monkeypatch.context() as patched:
        patched.setattr(launch, "renew_lease", database_away)
        patched.setattr(stop, "transition", database_away)
        tasks.resume_start(instance.pk)
    assert not processes.is_alive(pid, create_time)  # given up: its llama-server is stopped all the same
    instance.refresh_from_db()
    assert instance.status == Status.STARTING  # nothing could be written

    # The database is back; the lease has run out; the host's reconcile pass settles the instance.
    GpuInstance.objects.filter(pk=instance.pk).update(lease_expires_at=timezone.now())
    with django_capture_on_commit_callbacks(execute=True):
        assert reconcile.reconcile_host("testhost") == {"failed": 1}
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.error.startswith(f"the load failed: unexpected error: OperationalError: {OUTAGE}"), (
        instance.error
    )
    assert "the worker that started it was lost" not in instance.error


def test_the_noted_cause_of_an_earlier_start_does_not_count(tmp_path):
    log = tmp_path / "instance.log"
    processes.note_failure(log, "unexpected error: OperationalError: gone")
    assert processes.failure_note(str(log)) == "unexpected error: OperationalError: gone"
    with open(log, "ab") as handle:
        handle.write(b"[llamacontroller] 2026-12-06 12:00:00 starting: ['llama-server']\nloading\n")
    assert processes.failure_note(str(log)) is None
