"""Several models on one GPU, end to end: a real Celery worker, the real llama-server, the tiny model registered
three times, on simulated GPUs. Two models share GPU 0, each with its own per-process memory; the GPU is full,
so a cold request for a third evicts the least recently used idle one (with its event) and is served; a model
with a request in flight is never chosen. And six concurrent requests right after an unload all join one load."""

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from models_app import keepalive, ondemand, processes
from models_app.memory import refresh_host_memory
from models_app.models import GpuInstance, InstanceEvent, LlamaBinary, ModelConfig
from tests.helpers import callers_at_once, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Status = GpuInstance.Status
TOTAL_MIB = 1400  # with a 200 MiB headroom (claims of about 500 MiB): two tiny models on GPU 0, not three


@pytest.fixture
def small_gpu(celery_worker, fake_gpus, settings):
    """GPU 0 of 1400 MiB; GPU 1 full of memory nobody of ours uses (so everything goes to GPU 0)."""
    data = json.loads(fake_gpus.path.read_text())
    data["gpus"][0]["memory_total_mib"] = TOTAL_MIB
    data["gpus"][1]["baseline_used_mib"] = data["gpus"][1]["memory_total_mib"]
    fake_gpus.path.write_text(json.dumps(data))
    settings.GPU_HEADROOM_MIB = 200
    settings.EVICT_MIN_IDLE_SECONDS = 0
    settings.EVICT_MIN_RESIDENCY_SECONDS = 0
    wait_until(
        lambda: LlamaBinary.objects.filter(host=fake_gpus.host, is_default=True, error="").exists(),
        what="the worker's default llama-server",
    )
    refresh_host_memory(fake_gpus.host.name)
    return fake_gpus


def models_like(tiny_model, *names):
    return [
        ModelConfig.objects.create(
            id=name, name=name, path=tiny_model.path, cli_params=tiny_model.cli_params, on_demand=True
        )
        for name in names
    ]


def unload_everything():
    for instance in GpuInstance.objects.filter(status__in=[Status.RUNNING, Status.STARTING, Status.PENDING]):
        ondemand.services.request_unload(instance=instance, actor=None)
    wait_until(lambda: not GpuInstance.objects.exclude(status__in=[Status.STOPPED, Status.FAILED]).exists(),
               what="every instance stopped")  # fmt: skip


def test_two_models_share_a_gpu_and_a_cold_third_evicts_the_idle_one(small_gpu, tiny_model, users):
    alpha, beta, gamma = models_like(tiny_model, "alpha", "beta", "gamma")
    first = ondemand.ensure_running(alpha, users["viewer"], timeout=60)
    second = ondemand.ensure_running(beta, users["viewer"], timeout=60)
    assert (first.gpu_ids, second.gpu_ids) == ("0", "0") and first.pid != second.pid

    refresh_host_memory(small_gpu.host.name)
    first.refresh_from_db()
    second.refresh_from_db()
    for instance in (first, second):  # each model's own processes, not the GPU's total
        assert instance.memory_source == GpuInstance.MemorySource.PROCESS, instance
        assert 0 < instance.memory_used_mb < TOTAL_MIB
    print(f"\ntwo models on GPU 0: alpha {first.memory_used_mb} MiB, beta {second.memory_used_mb} MiB")

    # alpha is the least recently used, but a slow stream holds it: beta goes
    GpuInstance.objects.filter(pk=first.pk).update(last_used_at=timezone.now() - timedelta(minutes=30))
    assert keepalive.request_started(first.pk) is True
    try:
        third = ondemand.ensure_running(gamma, users["viewer"], timeout=60)
    finally:
        keepalive.request_finished(first.pk)
    assert third.status == Status.RUNNING and third.gpu_ids == "0"
    second.refresh_from_db()
    first.refresh_from_db()
    assert second.status == Status.STOPPED and first.status == Status.RUNNING
    assert not processes.is_alive(second.pid, second.process_create_time)
    assert processes.health_status(first.port) == 200 and processes.health_status(third.port) == 200
    evicted = second.events.get(kind=InstanceEvent.Kind.EVICTED)
    assert evicted.reason == "idle_lru"
    assert evicted.detail.startswith(f"beta (#{second.pk}, loaded on demand by viewer) was unloaded for ")
    print(f"eviction event: {evicted.detail!r}")
    unload_everything()


def test_requests_right_after_an_unload_all_join_one_load(small_gpu, tiny_model, users):
    (alpha,) = models_like(tiny_model, "alpha")
    first = ondemand.ensure_running(alpha, users["operator"], timeout=60)
    ondemand.unload_now(alpha, users["operator"])  # Ollama's keep_alive 0: it is stopping now

    threads, results, errors = callers_at_once(alpha, users["viewer"], 6, timeout=60)
    for thread in threads:
        thread.join(90)
    assert errors == [] and len(results) == 6, errors
    assert len(set(results)) == 1 and results[0] != first.pk  # one new load, joined by all six
    unload_everything()
