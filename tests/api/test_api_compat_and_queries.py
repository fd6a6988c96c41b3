"""The original LlamaController's endpoints answer in its shapes; list endpoints cost a fixed number of
queries however many GPUs and instances there are."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from tests.api.factories import make_gpus, make_instance

SEED_FIELDS = {"gpu_id", "port", "model_id", "model_name", "status", "loaded_at", "uptime_seconds", "pid",
               "memory_used_mb", "memory_total_mb"}  # fmt: skip


@pytest.fixture
def viewer_client(users):
    client = APIClient()
    client.force_login(users["viewer"])
    return client


def test_instance_fields_include_the_seed_fields(viewer_client, users, fake_gpus, tiny_model):
    instance = make_instance(fake_gpus.gpus, tiny_model, owner=users["operator"], memory_used_mb=5123,
                             memory_total_mb=81559)  # fmt: skip
    data = viewer_client.get(f"/api/v1/instances/{instance.pk}/").json()
    assert SEED_FIELDS | {"id", "memory_percent", "memory_source", "memory_updated_at", "owner"} <= set(data)
    assert data["gpu_id"] == "0,1" and data["memory_percent"] == 6.3 and data["owner"] == "operator"


def test_unknown_memory_is_null_not_zero(viewer_client, fake_gpus, tiny_model):
    instance = make_instance([fake_gpus.gpus[0]], tiny_model, memory_source="none", memory_used_mb=None)
    assert viewer_client.get(f"/api/v1/instances/{instance.pk}/").json()["memory_percent"] is None


def test_compat_gpu_status(viewer_client, users, fake_gpus, tiny_model):
    make_gpus(1)  # a third, free GPU
    make_instance(fake_gpus.gpus, tiny_model, owner=users["operator"])
    gpus = viewer_client.get("/api/v1/gpu/status").json()["gpus"]
    assert [g["gpu_id"] for g in gpus] == ["0,1", "2"]  # the two-GPU instance once, then the free GPU
    assert all(set(g) >= SEED_FIELDS for g in gpus)
    assert gpus[0]["model_id"] == "tiny" and gpus[0]["status"] == "running"
    assert gpus[1]["model_id"] is None and gpus[1]["status"] == "stopped"


def test_compat_models_status(viewer_client, users, fake_gpus, tiny_model):
    make_instance([fake_gpus.gpus[1]], tiny_model, owner=users["operator"], status="pending")
    [entry] = viewer_client.get("/api/v1/models/status").json()
    assert entry["model_id"] == "tiny" and entry["loaded"] is True
    assert entry["status"] == "starting" and entry["gpu_id"] == "1"


def test_compat_load_and_unload(users, fake_gpus, tiny_model, django_capture_on_commit_callbacks):
    client = APIClient()
    client.force_login(users["operator"])
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post("/api/v1/models/load", {"model_id": "tiny", "gpu_id": 0}, format="json")
    body = response.json()
    assert response.status_code == 200 and body["success"] is True, body
    assert body["gpu_id"] == "0" and body["model_id"] == "tiny" and "message" in body and len(callbacks) == 1

    response = client.post("/api/v1/models/load", {"model_id": "tiny", "gpu_id": "0"}, format="json")
    assert response.status_code == 409 and response.json()["success"] is False

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post("/api/v1/models/unload", {"gpu_id": "0"}, format="json")
    assert response.status_code == 200 and response.json()["success"] is True and len(callbacks) == 1
    response = client.post("/api/v1/models/unload", {"gpu_id": "1"}, format="json")
    assert response.status_code == 404 and response.json()["success"] is False


def _queries(client, url, **headers) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url, **headers)
    assert response.status_code == 200, response.content[:300]
    return len(captured)


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/gpus/",
        "/api/v1/instances/",
        "/api/v1/gpu/status",
        "/api/v1/models/status",
        "/api/v1/events/",
        "/api/v1/users/",
    ],  # fmt: skip
)
def test_list_queries_do_not_grow(users, tiny_model, url):
    client = APIClient()
    client.force_login(users["admin"])
    gpus = make_gpus(1)
    make_instance(gpus, tiny_model, owner=users["operator"])
    one = _queries(client, url)
    more = make_gpus(7)
    for gpu in more:
        make_instance([gpu], tiny_model, owner=users["operator2"])
    assert _queries(client, url) == one


def test_schema_and_docs_are_served_locally(client):
    assert client.get("/api/schema/").status_code == 200
    page = client.get("/api/docs/").content.decode()
    assert "cdn" not in page.lower() and "/static/drf_spectacular_sidecar/" in page


def test_compat_load_accepts_form_fields_and_defaults_to_gpu_0(
    users, fake_gpus, tiny_model, django_capture_on_commit_callbacks
):
    client = APIClient()
    client.force_login(users["operator"])
    response = client.post("/api/v1/models/load", {"model_id": "tiny", "gpu_id": "0,0"})
    assert response.status_code == 400 and "gpu_id" in response.json()
    with django_capture_on_commit_callbacks(execute=False):
        response = client.post("/api/v1/models/load", {"model_id": "tiny"})
    assert response.status_code == 200 and response.json()["gpu_id"] == "0"
