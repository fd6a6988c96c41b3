"""The periodic refresh through a real worker on real Redis: a real process whose memory grows shows the
growth after the next refresh; a failing driver is survived by the worker."""

import time

import pytest

from gpus.models import Gpu, Host
from llamacontroller_site.celery import app
from models_app.models import GpuInstance
from tests.conftest import FAKE_GPU_UUIDS, HOST_NAME
from tests.helpers import grow, running_instance

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
