"""The periodic refresh through a real worker on real Redis: a real process whose memory grows shows the
growth after the next refresh; a failing driver is survived by the worker; between refreshes the worker's live
thread keeps the figures a second or two old without storing history (models_app/live.py)."""

import time

import pytest
from django.utils import timezone

from gpus.models import Gpu, Host, MemorySample
from llamacontroller_site.celery import app
from models_app.models import GpuInstance
from tests.conftest import FAKE_GPU_UUIDS, HOST_NAME
from tests.helpers import grow, running_instance, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def refresh_through_worker(timeout: float = 30.0):
    """Send the refresh task to the host's queue and wait until the worker has written the host's heartbeat."""
    before = Host.objects.get(name=HOST_NAME).last_seen
    app.send_task("models_app.tasks.refresh_host", args=[HOST_NAME], queue=f"host.{HOST_NAME}")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if Host.objects.get(name=HOST_NAME).last_seen != before:
            time.sleep(0.2)  # the instance rows are written right after the host row
            return
        time.sleep(0.1)
    raise AssertionError("the worker did not refresh within the timeout")


def test_refresh_task_on_a_real_worker_shows_memory_growth(
    start_worker, fake_gpus, tiny_model, child_on_gpus
):
    child = child_on_gpus(FAKE_GPU_UUIDS[0])
    instance = running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[:1], pid=child.pid)
    start_worker()

    refresh_through_worker()
    instance.refresh_from_db()
    assert instance.memory_source == "process"
    before, taken = instance.memory_used_mb, instance.memory_updated_at

    grow(child)
    grow(child)
    refresh_through_worker()
    instance.refresh_from_db()
    assert instance.memory_used_mb >= before + 120
    assert instance.memory_updated_at > taken


def test_worker_survives_a_failing_driver_and_recovers(start_worker, fake_gpus, tiny_model, child_on_gpus):
    child = child_on_gpus(FAKE_GPU_UUIDS[1])
    instance = running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[1:], pid=child.pid)
    start_worker()
    fake_gpus.write(fail="NVML: Driver Not Loaded")
    refresh_through_worker()
    assert set(Gpu.objects.values_list("state", flat=True)) == {"unavailable"}
    assert GpuInstance.objects.get(pk=instance.pk).memory_source == "none"

    fake_gpus.write(fail=None)
    refresh_through_worker()
    assert Gpu.objects.get(index=1).state == "model_loaded"
    assert GpuInstance.objects.get(pk=instance.pk).memory_source == "process"


def test_the_workers_live_thread_follows_the_memory_between_refreshes(
    start_worker, fake_gpus, tiny_model, child_on_gpus, settings
):
    settings.GPU_LIVE_SECONDS = 1  # and no refresh task at all: no beat runs in this test
    child = child_on_gpus(FAKE_GPU_UUIDS[0])
    instance = running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[:1], pid=child.pid)
    started = timezone.now()
    start_worker()

    def figure_after(moment):
        row = GpuInstance.objects.get(pk=instance.pk)
        return row if row.memory_updated_at and row.memory_updated_at > moment else None

    before = wait_until(lambda: figure_after(started), 30, "a live figure")
    grow(child)
    grow(child)
    grown = timezone.now()
    after = wait_until(lambda: figure_after(grown), 10, "a live figure after the growth")
    assert after.memory_used_mb >= before.memory_used_mb + 120 and after.memory_source == "process"
    assert Gpu.objects.get(pk=fake_gpus.gpus[0].pk).state == "model_loaded"
    assert not MemorySample.objects.exists()  # the history keeps the full refresh's rate
