"""Bad input answers 400 naming the field and the reason; busy GPUs 409; a dead broker 503; unknown
objects 404 — and in each case nothing is created or changed, and nothing is queued."""

import pytest
from rest_framework.test import APIClient

from gpus.models import Gpu
from models_app.models import GpuInstance, InstanceEvent, InstanceGpu, ModelConfig
from tests.api.factories import make_gpus, make_instance


def counts():
    return (GpuInstance.objects.count(), InstanceGpu.objects.count(), InstanceEvent.objects.count(),
            ModelConfig.objects.count())  # fmt: skip


@pytest.fixture
def operator_client(users):
    client = APIClient()
    client.force_login(users["operator"])
    return client


@pytest.fixture
def broken_model(tiny_model, settings, tmp_path):
    bad = settings.MODEL_DIRS[0] / "not-really.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    return ModelConfig.objects.create(id="broken", name="Broken", path=str(bad))


@pytest.mark.parametrize(
    ("body", "field", "reason"),
    [
        ({"model_id": "tiny", "gpu_id": ""}, "gpu_id", "blank"),
        ({"model_id": "tiny", "gpu_id": "0,,1"}, "gpu_id", "empty entry"),
        ({"model_id": "tiny", "gpu_id": "-1"}, "gpu_id", "negative"),
        ({"model_id": "tiny", "gpu_id": "a"}, "gpu_id", "not a number"),
        ({"model_id": "tiny", "gpu_id": "0,0"}, "gpu_id", "twice"),
        ({"model_id": "tiny", "gpu_id": "7"}, "gpu_id", "unknown GPU 7"),
        ({"model_id": "tiny", "gpu_id": "0,5"}, "gpu_id", "not on one host"),
        ({"model_id": "nosuch", "gpu_id": "0"}, "model_id", "unknown model"),
        ({"model_id": "broken", "gpu_id": "0"}, "model_id", "bad magic"),
        ({"gpu_id": "0"}, "model_id", "required"),
        ({"model_id": "tiny", "gpu_id": "0", "host": "elsewhere"}, "host", "unknown host"),
    ],
    ids=[
        "empty",
        "double-comma",
        "negative",
        "letter",
        "repeated",
        "unknown-gpu",
        "two-hosts",
        "unknown-model",
        "unreadable-model",
        "missing-model",
        "unknown-host",
    ],  # fmt: skip
)
def test_bad_load_input(
    operator_client,
    fake_gpus,
    tiny_model,
    broken_model,
    body,
    field,
    reason,
    django_capture_on_commit_callbacks,
):
    # Another host with a GPU 5, so that "0,5" names GPUs of two hosts.
    make_gpus(1, host_name="otherhost")
    Gpu.objects.filter(host__name="otherhost").update(index=5)
    before = counts()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = operator_client.post("/api/v1/instances/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json(), response.json()
    assert reason in " ".join(response.json()[field]), response.json()
    assert counts() == before
    assert not callbacks


def test_busy_gpu_is_409(operator_client, users, fake_gpus, tiny_model, django_capture_on_commit_callbacks):
    make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator2"])
    before = counts()
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = operator_client.post(
            "/api/v1/instances/", {"model_id": "tiny", "gpu_id": "1,0"}, format="json"
        )
    assert response.status_code == 409 and response.json()["code"] == "busy"
    assert "tiny already runs on GPU 0 on testhost" in response.json()["detail"]
    assert counts() == before and not callbacks


def test_broker_down_is_503(operator_client, users, fake_gpus, tiny_model, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    instance = make_instance([fake_gpus.gpus[1]], tiny_model, owner=users["operator"])
    before = counts()
    response = operator_client.post("/api/v1/instances/", {"model_id": "tiny", "gpu_id": "0"}, format="json")
    assert response.status_code == 503
    assert "unreachable" in response.json()["detail"]
    response = operator_client.post(f"/api/v1/instances/{instance.pk}/unload/")
    assert response.status_code == 503
    assert counts() == before
    instance.refresh_from_db()
    assert instance.status == GpuInstance.Status.RUNNING


def test_unknown_instance_is_404(operator_client, fake_gpus):
    assert operator_client.get("/api/v1/instances/99999/").status_code == 404
    assert operator_client.post("/api/v1/instances/99999/unload/").status_code == 404
    assert operator_client.get("/api/v1/models/nosuch/").status_code == 404


def test_switch_to_unknown_model_changes_nothing(operator_client, users, fake_gpus, tiny_model):
    instance = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    before = counts()
    response = operator_client.post(
        f"/api/v1/instances/{instance.pk}/switch/", {"model_id": "nosuch"}, format="json"
    )
    assert response.status_code == 400 and "model_id" in response.json()
    assert counts() == before
    instance.refresh_from_db()
    assert instance.status == GpuInstance.Status.RUNNING


def test_unloading_a_stopped_instance_is_400(operator_client, users, fake_gpus, tiny_model):
    instance = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"], status="stopped")
    before = counts()
    assert operator_client.post(f"/api/v1/instances/{instance.pk}/unload/").status_code == 400
    assert counts() == before


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"id": "x", "name": "X", "path": "/etc/passwd.gguf"}, "path"),
        ({"id": "x", "name": "X", "path": "{folder}/missing.gguf"}, "path"),
        ({"id": "x", "name": "X", "path": "{tiny}", "cli_params": {"--port": 1}}, "cli_params"),
        ({"id": "x", "name": "X", "path": "{tiny}", "cli_params": {"port": 1}}, "cli_params"),
        ({"id": "x", "name": "X", "path": "{tiny}", "cli_params": ["c"]}, "cli_params"),
        ({"id": "bad id!", "name": "X", "path": "{tiny}"}, "id"),
    ],
)
def test_bad_registry_input(users, tiny_model, settings, body, field):
    client = APIClient()
    client.force_login(users["admin"])
    body = {k: v.format(folder=settings.MODEL_DIRS[0], tiny=tiny_model.path) if isinstance(v, str) else v
            for k, v in body.items()}  # fmt: skip
    before = counts()
    response = client.post("/api/v1/models/", body, format="json")
    assert response.status_code == 400 and field in response.json(), response.json()
    assert counts() == before


def test_registry_create_reads_the_gguf_facts(users, tiny_model):
    client = APIClient()
    client.force_login(users["admin"])
    response = client.post(
        "/api/v1/models/",
        {"id": "t3", "name": "T3", "path": tiny_model.path, "cli_params": {"c": 512}},
        format="json",
    )
    assert response.status_code == 201, response.json()
    assert response.json()["file_size_bytes"] > 0
    assert response.json()["gguf_metadata"] == tiny_model.gguf_metadata
    assert InstanceEvent.objects.filter(kind="registry_changed", actor=users["admin"]).exists()


def test_deleting_a_model_with_instances_is_409(users, fake_gpus, tiny_model):
    make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"], status="stopped")
    client = APIClient()
    client.force_login(users["admin"])
    assert client.delete("/api/v1/models/tiny/").status_code == 409
    assert ModelConfig.objects.filter(pk="tiny").exists()


def test_event_filters_validate(users):
    client = APIClient()
    client.force_login(users["admin"])
    assert client.get("/api/v1/events/?since=yesterday").status_code == 400
    assert client.get("/api/v1/events/?instance=abc").status_code == 400


@pytest.mark.parametrize(("field", "value"), [("metadata", None), ("metadata", [1, 2]), ("cli_params", None)])
def test_model_update_with_null_or_wrong_json_never_500(users, tiny_model, field, value):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_login(users["admin"])
    body = {"name": "Tiny", "path": tiny_model.path, field: value}
    response = client.put(f"/api/v1/models/{tiny_model.pk}/", body, format="json")
    assert response.status_code in (200, 400), response.content
    tiny_model.refresh_from_db()
    assert isinstance(tiny_model.metadata, dict) and isinstance(tiny_model.cli_params, dict)
    if value == [1, 2]:
        assert response.status_code == 400 and "metadata" in response.json()


def test_an_admin_cannot_lock_themselves_out(users):
    from rest_framework.test import APIClient

    admin = users["admin"]
    client = APIClient()
    client.force_login(admin)
    url = f"/api/v1/users/{admin.pk}/"
    assert client.patch(url, {"is_active": False}, format="json").status_code == 400
    assert client.patch(url, {"role": "viewer"}, format="json").status_code == 400
    assert client.delete(url).status_code == 400
    admin.refresh_from_db()
    assert admin.is_active and admin.is_superuser
    # Other users, yes.
    assert (
        client.patch(f"/api/v1/users/{users['viewer'].pk}/", {"is_active": False}, format="json").status_code
        == 200
    )
