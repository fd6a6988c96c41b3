"""Small truths of state (issue 16, item 9): an instance that stopped, crashed or failed shows no memory
figure; an empty gpu_id (or host) is refused in every encoding, as JSON's empty string always was."""

from io import StringIO
from urllib.parse import urlencode

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from gpus.services import InstanceMemory
from models_app import memory
from models_app.models import GpuInstance, LlamaBinary
from models_app.state import transition
from tests.api.factories import make_gpus, make_instance

Status = GpuInstance.Status


@pytest.fixture
def admin_client(users):
    client = APIClient()
    client.force_login(users["admin"])
    return client


@pytest.mark.parametrize(
    "before, ending",
    [(Status.STOPPING, Status.STOPPED), (Status.RUNNING, Status.CRASHED), (Status.STOPPING, Status.FAILED)],
)
def test_an_ended_instance_shows_no_memory_figure(admin_client, users, tiny_model, before, ending):
    gpus = make_gpus(1)
    instance = make_instance(
        gpus,
        tiny_model,
        status=before,
        memory_used_mb=342,
        memory_total_mb=81559,
        memory_updated_at=timezone.now(),
    )
    assert transition(instance, ending, expected=[before], event_kind="unloaded")
    row = admin_client.get(f"/api/v1/instances/{instance.pk}/").json()
    assert row["status"] == ending
    assert (row["memory_used_mb"], row["memory_percent"], row["memory_source"]) == (None, None, "none")
    assert row["memory_updated_at"] is None
    out = StringIO()
    call_command("ps", "--all", stdout=out)
    assert "342 MiB" not in out.getvalue()
    assert "N/A" in out.getvalue()


def test_a_refresh_that_read_the_claims_before_the_stop_writes_no_figure_on_it(users, tiny_model):
    """The refresh reads the active claims, samples the GPUs (slow), then writes: a stop in between must not
    get its figure back."""
    instance = make_instance(make_gpus(1), tiny_model, status=Status.STOPPING)
    transition(instance, Status.STOPPED, expected=[Status.STOPPING], event_kind="unloaded")
    figure = InstanceMemory(
        instance.pk, used_mib=342, total_mib=81559, source="process", taken_at=timezone.now()
    )
    memory._store_figures([figure])
    instance.refresh_from_db()
    assert instance.memory_used_mb is None and instance.memory_percent is None


def test_a_running_instance_keeps_its_figure(users, tiny_model):
    instance = make_instance(make_gpus(1), tiny_model)
    figure = InstanceMemory(
        instance.pk, used_mib=342, total_mib=81559, source="process", taken_at=timezone.now()
    )
    memory._store_figures([figure])
    instance.refresh_from_db()
    assert (instance.memory_used_mb, instance.memory_percent) == (342, 0.4)


@pytest.mark.parametrize("url", ["/api/v1/instances/", "/api/v1/models/load"])
@pytest.mark.parametrize("encoding", ["json", "form"])
@pytest.mark.parametrize("field", ["gpu_id", "host"])
def test_an_empty_gpu_id_or_host_is_a_400_in_every_encoding(
    admin_client, fake_gpus, tiny_model, url, encoding, field
):
    body = {"model_id": "tiny", "gpu_id": "0", field: ""}
    if encoding == "json":
        response = admin_client.post(url, body, format="json")
    else:  # what `curl -d model_id=tiny -d gpu_id=` sends
        form = urlencode(body)
        response = admin_client.generic("POST", url, form, content_type="application/x-www-form-urlencoded")
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert not GpuInstance.objects.exists()


@pytest.mark.parametrize("gpu_id", [None, "auto", "AUTO"])
def test_an_omitted_gpu_id_or_auto_places_automatically(
    admin_client, fake_gpus, tiny_model, gpu_id, django_capture_on_commit_callbacks
):
    LlamaBinary.objects.create(host=fake_gpus.host, name="default", path="/opt/llama-server", is_default=True)
    body = "model_id=tiny" + (f"&gpu_id={gpu_id}" if gpu_id is not None else "")
    with django_capture_on_commit_callbacks(execute=False):  # no worker here: the load task is not sent
        response = admin_client.generic(
            "POST", "/api/v1/instances/", body, content_type="application/x-www-form-urlencoded"
        )
    assert response.status_code == 202, response.content
    assert response.json()["gpu_id"] in ("0", "1")
