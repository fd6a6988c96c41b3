"""Load on demand and idle unload end to end: a real Celery worker, the real llama-server, the tiny model on the
simulated GPUs. A cold model is woken by two concurrent callers (one load, shared), then unloaded for
idleness by the beat task's function, with the event."""

import threading
import time

import pytest
from django.db import connection

from models_app import keepalive, ondemand, processes, tasks
from models_app.models import GpuInstance, InstanceEvent, LlamaBinary, ModelConfig
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Status = GpuInstance.Status


def test_cold_model_loads_on_demand_once_for_concurrent_callers_then_idles_out(
    celery_worker, fake_gpus, tiny_model, users, settings
):
    # The worker registers its llama-server when it starts; placement needs a host that has one.
    wait_until(
        lambda: LlamaBinary.objects.filter(host=fake_gpus.host, is_default=True, error="").exists(),
        what="the worker's default llama-server",
    )
    ModelConfig.objects.filter(pk=tiny_model.pk).update(on_demand=True)  # a viewer may wake it
    tiny_model.refresh_from_db()
    assert not GpuInstance.objects.exists()

    results, errors = [], []
    barrier = threading.Barrier(2)

    def call(who):
        try:
            barrier.wait()
            started = time.monotonic()
            instance = ondemand.ensure_running(tiny_model, users[who], timeout=90)
            results.append((who, instance.pk, time.monotonic() - started))
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=call, args=(who,)) for who in ("viewer", "operator")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    assert len(results) == 2 and len({pk for _, pk, _ in results}) == 1, results
    instance = GpuInstance.objects.get()  # one load, shared
    assert instance.status == Status.RUNNING and instance.loaded_on_demand
    assert processes.health_status(instance.port) == 200
    assert instance.events.filter(kind=InstanceEvent.Kind.REQUESTED).count() == 1
    assert "on demand" in instance.events.get(kind=InstanceEvent.Kind.REQUESTED).detail
    print(f"\ncold load on demand: {', '.join(f'{who} {seconds:.2f} s' for who, _, seconds in results)}")

    # A third caller gets the running instance at once.
    started = time.monotonic()
    assert ondemand.ensure_running(tiny_model, users["viewer"]).pk == instance.pk
    assert time.monotonic() - started < 1

    # A request asks for a 1 s keep-alive; while it is in flight nothing unloads.
    assert keepalive.request_started(instance.pk, keep_alive_seconds=1) is True
    time.sleep(1.2)
    assert ondemand.unload_idle() == []
    keepalive.request_finished(instance.pk)
    assert ondemand.unload_idle() == []  # it was used just now
    time.sleep(1.2)

    assert tasks.unload_idle() == 1  # the beat task's function
    wait_until(
        lambda: GpuInstance.objects.get(pk=instance.pk).status == Status.STOPPED, what="the idle unload"
    )
    assert not processes.is_alive(instance.pid, instance.process_create_time)
    event = instance.events.get(kind=InstanceEvent.Kind.IDLE_UNLOAD)
    assert event.actor_name == "system"
    assert event.detail.startswith("idle for 1 s (keep-alive 1 s)"), event.detail
    assert instance.events.filter(kind=InstanceEvent.Kind.UNLOADED).exists()
    print(f"idle unload event: {event.detail!r}")
