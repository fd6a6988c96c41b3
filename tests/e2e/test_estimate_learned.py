"""Estimates that learn, end to end (real Redis, a real Celery worker, the real llama-server, the tiny model,
the simulated GPUs): the first load stores its estimate, the post-load measurement records the error (a field
and an event), and the second load of the model on that kind of GPU is predicted from what the first used."""

import time

import pytest
from rest_framework.test import APIClient

from models_app import binaries
from models_app.models import GpuInstance, InstanceEvent
from models_app.services import request_load, request_unload
from tests.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]
Status = GpuInstance.Status


def loaded(instance, timeout=30.0) -> GpuInstance:
    """The instance once running and measured (its estimate checked)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instance.refresh_from_db()
        if instance.status == Status.FAILED:
            raise AssertionError(instance.error)
        if instance.status == Status.RUNNING and instance.memory_measured_mb is not None:
            return instance
        time.sleep(0.05)
    raise AssertionError(f"instance #{instance.pk} is {instance.status}, not measured")


def stopped(instance, timeout=30.0):
    request_unload(instance=instance, actor=None)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instance.refresh_from_db()
        if instance.status == Status.STOPPED:
            return
        time.sleep(0.05)
    raise AssertionError(f"instance #{instance.pk} did not stop")


def test_second_load_is_predicted_from_the_first(celery_worker, fake_gpus, tiny_model, users):
    binaries.store_on_host(fake_gpus.host)  # the worker's llama-server: its version keys the calibration
    client = APIClient()
    client.force_login(users["viewer"])

    first = loaded(request_load(model_id="tiny", gpu_spec="0", actor=users["operator"]))
    stored = first.memory_estimate
    assert first.memory_estimated_mb == stored["estimated_mib"] == stored["formula_mib"] > 0
    assert stored["correction"] == {"factor": 1.0, "loads": 0} and stored["gpu_name"] == "Simulated RTX 4090"
    assert (
        stored["llama_version"] and stored["breakdown"]["gpus"][0]["kv_mib"] == 0.12
    )  # 256 cells x 2 layers x 128 x 2 B
    assert first.memory_measured_mb == first.memory_used_mb > 0
    error = round((first.memory_measured_mb - first.memory_estimated_mb) * 100 / first.memory_estimated_mb, 1)
    assert first.memory_estimate_error_pct == error
    # llama.cpp's own estimate (llama-fit-params, where the build has it) is stored beside ours.
    opinion = first.memory_estimate.get("fit_params")
    assert opinion is None or opinion[0]["model_mib"] >= 0
    # The estimate event follows the measured figure that `loaded` waited for: wait for it too.
    event = wait_until(
        lambda: first.events.filter(kind=InstanceEvent.Kind.ESTIMATE).first(), 10, "the estimate event"
    )
    assert f"estimated {first.memory_estimated_mb} MiB" in event.detail
    assert f"measured {first.memory_measured_mb} MiB (process): error {error:+.1f} %" in event.detail
    stopped(first)

    # What the model would take now: the API shows the corrected estimate and where it comes from.
    body = client.get("/api/v1/models/tiny/estimate/?gpu_id=0").json()
    assert body["correction"]["loads"] == 1
    assert "from 1 loads" in body["summary"]
    assert body["estimated_mib"] == pytest.approx(first.memory_measured_mb, abs=1)

    second = loaded(request_load(model_id="tiny", gpu_spec="0", actor=users["operator"]))
    assert second.memory_estimate["correction"]["loads"] == 1
    assert second.memory_estimated_mb == body["estimated_mib"]
    # The simulated GPU measures the process's RSS (no CUDA context): the first estimate was far off, the
    # second is as close as two loads of the same process are to each other.
    assert abs(second.memory_estimate_error_pct) < 25 < abs(first.memory_estimate_error_pct)
    print(f"\nllama-fit-params on the first load: {opinion}")
    print(
        f"\nfirst load: estimated {first.memory_estimated_mb} MiB, measured {first.memory_measured_mb} MiB "
        f"({first.memory_estimate_error_pct:+.1f} %); second: estimated {second.memory_estimated_mb} MiB "
        f"({second.memory_estimate['summary']}), measured {second.memory_measured_mb} MiB "
        f"({second.memory_estimate_error_pct:+.1f} %)"
    )
    stopped(second)
