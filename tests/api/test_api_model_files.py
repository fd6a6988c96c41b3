"""The REST API and model files per host: a load may omit gpu_id (the controller chooses among the hosts that
have the file), a load on a host without the file is 409 with the reason, and the model API lists what each
host reported, in a fixed number of queries."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from gpus.models import Host
from models_app.models import GpuInstance, HostModelFile, ModelConfig
from tests.helpers import register_second_host

REASON = "/models/tiny.gguf does not exist there"


@pytest.fixture
def box2(fake_gpus, settings, tmp_path):
    return register_second_host("box-2", tmp_path / "box-2-gpus.json", settings)


@pytest.fixture
def operator(users):
    client = APIClient()
    client.force_login(users["operator"])
    return client


def load(client, body, callbacks):
    with callbacks(execute=False):  # the load task is not sent: no worker here
        return client.post("/api/v1/instances/", body, format="json")


def test_load_without_gpu_id_lets_the_controller_choose(
    operator, box2, fake_gpus, tiny_model, django_capture_on_commit_callbacks
):
    HostModelFile.objects.create(host=fake_gpus.host, model=tiny_model, available=False, reason=REASON)
    response = load(operator, {"model_id": "tiny"}, django_capture_on_commit_callbacks)
    assert response.status_code == 202, response.json()
    assert response.json()["host"] == "box-2"
    response = load(operator, {"model_id": "tiny", "gpu_id": "auto"}, django_capture_on_commit_callbacks)
    assert response.status_code == 202 and response.json()["host"] == "box-2"
    # box-2's two GPUs are taken; testhost has no file: nothing fits, and the answer says why.
    response = load(operator, {"model_id": "tiny"}, django_capture_on_commit_callbacks)
    body = response.json()
    assert response.status_code == 409 and body["code"] == "busy", body
    assert "GPU 0 on box-2: tiny" in body["detail"] and f"host testhost: {REASON}" in body["detail"]


def test_load_on_a_host_without_the_file_is_409_with_the_reason(
    operator, box2, tiny_model, django_capture_on_commit_callbacks
):
    HostModelFile.objects.create(host=box2, model=tiny_model, available=False, reason=REASON)
    expected = f"model tiny cannot load on host box-2: {REASON}"
    for body in ({"model_id": "tiny", "gpu_id": "0", "host": "box-2"}, {"model_id": "tiny", "host": "box-2"}):
        response = load(operator, body, django_capture_on_commit_callbacks)
        assert response.status_code == 409, response.json()
        assert response.json()["detail"] == expected and response.json()["model_id"] == [expected]
    assert not GpuInstance.objects.exists()
    response = load(operator, {"model_id": "tiny", "host": "nowhere"}, django_capture_on_commit_callbacks)
    assert response.status_code == 400 and response.json()["host"] == ["unknown host 'nowhere'"]


def test_compat_load_still_needs_gpu_indexes(
    operator, fake_gpus, tiny_model, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=False):
        response = operator.post("/api/v1/models/load", {"model_id": "tiny", "gpu_id": "auto"}, format="json")
    assert response.status_code == 400 and "not a number" in response.json()["message"]
    with django_capture_on_commit_callbacks(execute=False):
        response = operator.post("/api/v1/models/load", {"model_id": "tiny"}, format="json")
    assert response.status_code == 200 and response.json()["gpu_id"] == "0"


def test_model_api_lists_each_hosts_report_in_fixed_queries(operator, box2, fake_gpus, tiny_model):
    HostModelFile.objects.create(host=box2, model=tiny_model, available=False, reason=REASON)
    HostModelFile.objects.create(host=fake_gpus.host, model=tiny_model, available=True)
    hosts = operator.get("/api/v1/models/tiny/").json()["hosts"]
    assert [(h["host"], h["available"], h["reason"]) for h in hosts] == [
        ("box-2", False, REASON),
        ("testhost", True, ""),
    ]
    assert all(h["checked_at"] for h in hosts)

    def queries() -> int:
        with CaptureQueriesContext(connection) as captured:
            assert operator.get("/api/v1/models/").status_code == 200
        return len(captured)

    one = queries()
    for n in range(5):
        model = ModelConfig.objects.create(id=f"m{n}", name=f"m{n}", path=tiny_model.path)
        host = Host.objects.create(name=f"h{n}")
        HostModelFile.objects.create(host=host, model=model, available=True)
        HostModelFile.objects.create(host=box2, model=model, available=False, reason=REASON)
    assert queries() == one


def test_schema_documents_the_controllers_choice(operator):
    schema = operator.get("/api/schema/?format=json").json()
    load_schema = schema["components"]["schemas"]["Load"]
    assert "gpu_id" not in load_schema.get("required", [])
    assert "Omit gpu_id" in load_schema["properties"]["gpu_id"]["description"]
    assert "hosts" in schema["components"]["schemas"]["ModelConfig"]["properties"]
