"""A reservation drains a GPU end to end: a real Celery worker runs the beat task, which tells the owner during
the notice and unloads the real llama-server at the start; the holder's own model on another reserved GPU
stays, and after the end the GPU is everyone's again."""

from datetime import timedelta

import pytest
from django.utils import timezone

from llamacontroller_site.celery import app
from models_app import processes
from models_app.models import GpuInstance, InstanceEvent
from models_app.services import request_load, request_unload
from policy import reservations
from policy.models import DrainNotice, Reservation
from tests.helpers import wait_for, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Status = GpuInstance.Status


def run_drain():
    """What celery beat sends every minute, sent to the real worker."""
    app.send_task("policy.tasks.drain_reservations")


def test_a_reservation_drains_a_gpu_with_real_processes(celery_worker, users, tiny_model):
    holder, other = users["operator"], users["operator2"]
    theirs = wait_for(request_load(model_id="tiny", gpu_spec="0", actor=other), Status.RUNNING, timeout=90)
    kept = wait_for(request_load(model_id="tiny", gpu_spec="1", actor=holder), Status.RUNNING, timeout=90)
    host = theirs.host
    now = timezone.now()
    reservation = reservations.create(
        host=host, start=now + timedelta(minutes=10), end=now + timedelta(hours=1), purpose="fine-tune run",
        actor=users["admin"], gpu_indices=[0, 1], users=[holder], notice_minutes=30,
    )  # fmt: skip

    # during the notice: told once, nothing unloaded, others may not load there
    run_drain()
    notice = wait_until(
        lambda: InstanceEvent.objects.filter(
            kind=InstanceEvent.Kind.RESERVATION_NOTICE, instance=theirs
        ).first(),
        what="the drain notice",
    )
    assert "will be unloaded at" in notice.detail and "fine-tune run" in notice.detail
    assert reservations.blocks(other, host, [0], model_id="tiny").reason == "reservation"
    assert reservations.blocks(holder, host, [0]) is None
    theirs.refresh_from_db()
    assert theirs.status == Status.RUNNING

    # the window starts: the other user's llama-server is stopped for real; the holder's stays
    Reservation.objects.filter(pk=reservation.pk).update(start=timezone.now() - timedelta(seconds=1))
    run_drain()
    wait_for(theirs, Status.STOPPED, timeout=60)
    assert not processes.is_alive(theirs.pid, theirs.process_create_time)
    assert InstanceEvent.objects.filter(
        instance=theirs, kind=InstanceEvent.Kind.UNLOAD_REQUESTED, detail__startswith="reservation: tiny"
    ).exists()
    assert DrainNotice.objects.get(instance=theirs).drained_at is not None
    kept.refresh_from_db()
    assert kept.status == Status.RUNNING and processes.is_alive(kept.pid, kept.process_create_time)

    # after the end the GPUs are everyone's again
    Reservation.objects.filter(pk=reservation.pk).update(end=timezone.now() - timedelta(seconds=1))
    assert reservations.blocks(other, host, [0]) is None
    request = request_load(model_id="tiny", gpu_spec="0", actor=other)
    wait_for(request, Status.RUNNING, timeout=90)
    for instance in (kept, request):
        request_unload(instance=instance, actor=None)
        wait_for(instance, Status.STOPPED, timeout=60)
