"""The team policy on a shared GPU, end to end: a real Celery worker and llama-server, the tiny model registered
four times, GPU 0 with room for two. Two users with quotas: a model beyond its owner's quota is borrowed and is
reclaimed for the other user's load within quota, even though it was used a moment ago; a pinned model is never
unloaded to make room, and the refusal says so (pinned_no_room)."""

import pytest

from models_app import keepalive, ondemand, processes
from models_app.errors import Refused
from models_app.models import GpuInstance, InstanceEvent
from policy.models import Pin, Quota
from tests.e2e.test_sharing import models_like, small_gpu, unload_everything  # noqa: F401 (a fixture)

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Status = GpuInstance.Status


def test_borrowed_is_reclaimed_first_and_a_pin_is_never_broken(small_gpu, tiny_model, users, settings):  # noqa: F811
    settings.EVICT_MIN_IDLE_SECONDS = 600  # nothing is idle enough: only borrowed memory may be taken
    alice, bob = users["operator"], users["operator2"]
    Quota.objects.create(user=alice, models_loaded=1)
    Quota.objects.create(user=bob, models_loaded=2)
    alpha, beta, gamma, delta = models_like(tiny_model, "alpha", "beta", "gamma", "delta")

    mine = ondemand.ensure_running(alpha, alice, timeout=60)  # within alice's quota: guaranteed
    extra = ondemand.ensure_running(beta, alice, timeout=60)  # her second: borrowed, on free memory
    assert "borrowed" in extra.events.get(kind=InstanceEvent.Kind.REQUESTED).detail
    keepalive.request_started(extra.pk)  # used a moment ago ...
    keepalive.request_finished(extra.pk)  # ... and finished

    theirs = ondemand.ensure_running(gamma, bob, timeout=60)  # bob within his quota: beta makes room
    assert theirs.status == Status.RUNNING and theirs.gpu_ids == "0"
    extra.refresh_from_db()
    mine.refresh_from_db()
    assert extra.status == Status.STOPPED and mine.status == Status.RUNNING
    assert not processes.is_alive(extra.pid, extra.process_create_time)
    evicted = extra.events.get(kind=InstanceEvent.Kind.EVICTED)
    assert evicted.reason == "borrowed_reclaim" and "for operator2's request for gamma" in evicted.detail
    assert "beyond operator's quota (borrowed), reclaimed first" in evicted.detail
    print(f"\nborrowed reclaimed: {evicted.detail!r}")

    Pin.objects.create(instance=mine, pinned_by=users["admin"], reason="alice's demo")
    with pytest.raises(Refused) as refused:
        ondemand.ensure_running(delta, bob, timeout=10)
    assert refused.value.status == 503 and refused.value.message.startswith("pinned_no_room: ")
    assert "alice's demo" in refused.value.message
    mine.refresh_from_db()
    assert mine.status == Status.RUNNING and processes.health_status(mine.port) == 200
    print(f"pinned: {refused.value.message!r}")
    assert not GpuInstance.objects.filter(model=delta).exists()
    unload_everything()
