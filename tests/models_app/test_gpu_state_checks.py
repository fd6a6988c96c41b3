"""The server checks GPU state on every entry point: unavailable GPUs are refused with the reason, GPUs
occupied by other processes are refused naming them unless the model is predicted to fit beside them or the
caller forces (recorded in the event)."""

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.urls import reverse
from rest_framework.test import APIClient

from gpus.models import Gpu
from models_app import services
from models_app.errors import Refused
from models_app.models import GpuInstance, InstanceEvent

Kind = InstanceEvent.Kind
FOREIGN = [{"pid": 4242, "name": "python3", "used_mib": 9000, "owner": "foreign", "instance_id": None}]


@pytest.fixture(autouse=True)
def _no_enqueue(sent):
    return sent


def _unavailable(gpu, reason="GPU not reported by the driver any more"):
    Gpu.objects.filter(pk=gpu.pk).update(state=Gpu.State.UNAVAILABLE, state_reason=reason)


def _occupied(gpu, used_mib=24400):
    """Someone else's process on the GPU; by default it leaves 164 MiB of the 24564, too little for any
    model (the estimate alone counts ~300 MiB of CUDA context)."""
    Gpu.objects.filter(pk=gpu.pk).update(
        state=Gpu.State.OCCUPIED_BY_OTHERS, processes=FOREIGN, memory_used_mib=used_mib
    )


def test_load_onto_unavailable_gpu_is_refused_with_the_reason(fake_gpus, tiny_model, users):
    _unavailable(fake_gpus.gpus[1])
    for force in (False, True):  # force does not bring a GPU back
        with pytest.raises(Refused) as refused:
            services.request_load(model_id="tiny", gpu_spec="0,1", actor=users["operator"], force=force)
        assert refused.value.code == "busy" and refused.value.field == "gpu_id"
        assert refused.value.message == (
            "GPU 1 on testhost is unavailable: GPU not reported by the driver any more"
        )
    assert not GpuInstance.objects.exists()


def test_load_onto_occupied_gpu_needs_force_and_is_recorded(fake_gpus, tiny_model, users):
    _occupied(fake_gpus.gpus[0])
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    assert refused.value.code == "busy"
    assert "GPU 0 on testhost is occupied by other processes: python3 (pid 4242, 9000 MiB)" in (
        refused.value.message
    )
    instance = services.request_load(model_id="tiny", gpu_spec="0", actor=users["operator"], force=True)
    event = instance.events.get(kind=Kind.REQUESTED)
    assert event.actor_name == "operator"
    assert "forced over other processes: GPU 0 on testhost: python3 (pid 4242, 9000 MiB)" in event.detail


def test_an_occupied_gpu_with_room_for_the_model_loads_without_force(fake_gpus, tiny_model, users):
    _occupied(fake_gpus.gpus[0], used_mib=9010)  # 15.2 GiB free beside python3
    instance = services.request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    assert "forced" not in instance.events.get(kind=Kind.REQUESTED).detail
    assert instance.memory_estimated_mb and instance.memory_estimate["fits"] is True


def test_the_refusal_names_the_numbers(fake_gpus, tiny_model, users):
    _occupied(fake_gpus.gpus[0])
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    assert "MiB there and 164 MiB are free; load with force" in refused.value.message


def test_a_load_predicted_not_to_fit_is_refused_unless_forced(fake_gpus, tiny_model, users):
    Gpu.objects.filter(pk=fake_gpus.gpus[0].pk).update(memory_used_mib=24500)  # idle state, 64 MiB free
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    assert refused.value.code == "busy" and refused.value.field == "gpu_id"
    assert "tiny is predicted not to fit" in refused.value.message
    assert "GPU 0 needs 302 MiB, 64 MiB free" in refused.value.message
    instance = services.request_load(model_id="tiny", gpu_spec="0", actor=users["operator"], force=True)
    assert "(forced: tiny is predicted not to fit" in instance.events.get(kind=Kind.REQUESTED).detail


def test_switch_checks_gpu_state_too(fake_gpus, tiny_model, users):
    old = services.request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    _occupied(fake_gpus.gpus[0])
    with pytest.raises(Refused, match="occupied by other processes"):
        services.request_switch(model_id="tiny", gpu_spec="0", actor=users["operator"])
    new = services.request_switch(model_id="tiny", gpu_spec="0", actor=users["operator"], force=True)
    assert "forced over other processes" in new.events.get(kind=Kind.SWITCH_REQUESTED).detail
    old.refresh_from_db()
    assert old.status == GpuInstance.Status.STOPPING
    _unavailable(fake_gpus.gpus[0], "host testhost not heard from since 10:00")
    with pytest.raises(Refused, match="unavailable: host testhost not heard from since 10:00"):
        services.request_switch(model_id="tiny", gpu_spec="0", actor=users["operator"], force=True)


def test_rest_api_answers_409_and_takes_force(fake_gpus, tiny_model, users):
    client = APIClient()
    client.force_login(users["operator"])
    _unavailable(fake_gpus.gpus[0])
    response = client.post("/api/v1/instances/", {"model_id": "tiny", "gpu_id": "0"}, format="json")
    assert response.status_code == 409
    assert "unavailable: GPU not reported by the driver any more" in str(response.json())
    _occupied(fake_gpus.gpus[1])
    response = client.post("/api/v1/instances/", {"model_id": "tiny", "gpu_id": "1"}, format="json")
    assert response.status_code == 409 and "python3 (pid 4242" in str(response.json())
    response = client.post(
        "/api/v1/instances/", {"model_id": "tiny", "gpu_id": "1", "force": True}, format="json"
    )
    assert response.status_code == 202, response.json()
    instance = GpuInstance.objects.get(pk=response.json()["id"])
    # The switch action takes force as well.
    response = client.post(f"/api/v1/instances/{instance.pk}/switch/", {"model_id": "tiny"}, format="json")
    assert response.status_code == 409
    response = client.post(
        f"/api/v1/instances/{instance.pk}/switch/", {"model_id": "tiny", "force": True}, format="json"
    )
    assert response.status_code == 202, response.json()


def test_seed_compatible_api_answers_409_and_takes_force(fake_gpus, tiny_model, users):
    client = APIClient()
    client.force_login(users["operator"])
    _unavailable(fake_gpus.gpus[0])
    response = client.post("/api/v1/models/load", {"model_id": "tiny", "gpu_id": "0"}, format="json")
    assert response.status_code == 409 and response.json()["success"] is False
    assert "GPU not reported by the driver any more" in response.json()["message"]
    _occupied(fake_gpus.gpus[1])
    response = client.post("/api/v1/models/load", {"model_id": "tiny", "gpu_id": "1"}, format="json")
    assert response.status_code == 409
    response = client.post(
        "/api/v1/models/load", {"model_id": "tiny", "gpu_id": "1", "force": True}, format="json"
    )
    assert response.status_code == 200 and response.json()["success"] is True


def test_web_form_refuses_and_takes_force(client, fake_gpus, tiny_model, users):
    client.force_login(users["operator"])
    _occupied(fake_gpus.gpus[1])
    page = client.get(reverse("dashboard")).content.decode()
    assert 'name="force"' in page  # offered because a GPU is occupied by others
    htmx = {"HTTP_HX_REQUEST": "true"}
    response = client.post(reverse("load"), {"model_id": "tiny", "gpu": "testhost:1"}, **htmx)
    assert response.status_code == 409
    assert "occupied by other processes: python3 (pid 4242, 9000 MiB)" in response.content.decode()
    data = {"model_id": "tiny", "gpu": "testhost:1", "force": "1"}
    assert client.post(reverse("load"), data, **htmx).status_code == 200
    assert GpuInstance.objects.filter(gpu_ids="1").exists()


def test_admin_add_form_refuses_and_takes_force(client, fake_gpus, tiny_model, users):
    client.force_login(users["admin"])
    url = reverse("admin:models_app_gpuinstance_add")
    _unavailable(fake_gpus.gpus[0])
    response = client.post(url, {"model": "tiny", "gpu_id": "0"})
    assert response.status_code == 200 and "is unavailable" in response.content.decode()
    _occupied(fake_gpus.gpus[1])
    response = client.post(url, {"model": "tiny", "gpu_id": "1"})
    assert "occupied by other processes" in response.content.decode()
    response = client.post(url, {"model": "tiny", "gpu_id": "1", "force": "on"})
    assert response.status_code == 302
    assert GpuInstance.objects.filter(gpu_ids="1").exists()


def test_cli_refuses_and_takes_force(fake_gpus, tiny_model, users):
    _unavailable(fake_gpus.gpus[0])
    with pytest.raises(CommandError, match="GPU 0 on testhost is unavailable"):
        call_command("load", "tiny", "--gpu", "0")
    _occupied(fake_gpus.gpus[1])
    with pytest.raises(CommandError, match="occupied by other processes"):
        call_command("load", "tiny", "--gpu", "1", "--user", "operator")
    call_command("load", "tiny", "--gpu", "1", "--user", "operator", "--force")
    instance = GpuInstance.objects.get()
    with pytest.raises(CommandError, match="occupied by other processes"):
        call_command("switch", "tiny", "--gpu", "1")
    call_command("switch", "tiny", "--gpu", "1", "--force")
    assert GpuInstance.objects.exclude(pk=instance.pk).get().gpu_ids == "1"


def test_a_switch_counts_the_memory_of_the_instance_it_replaces_as_free(fake_gpus, tiny_model, users):
    old = services.request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    GpuInstance.objects.filter(pk=old.pk).update(memory_used_mb=24000)
    Gpu.objects.filter(pk=fake_gpus.gpus[0].pk).update(
        memory_used_mib=24400
    )  # 164 MiB free, with the old one
    new = services.request_switch(model_id="tiny", gpu_spec="0", actor=users["operator"])
    assert new.memory_estimate["per_gpu"][0]["free_mib"] == 164 + 24000
    assert "forced" not in new.events.get(kind=Kind.SWITCH_REQUESTED).detail
