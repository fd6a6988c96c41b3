"""The hosts endpoint, the host state on GPUs and instances, and list queries that do not grow with hosts."""

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from rest_framework.test import APIClient

from tests.api.factories import make_cluster, make_gpus

HOST_FIELDS = {"id", "name", "state", "down_reason", "last_seen", "worker_hostname", "worker_pid",
               "worker_started_at", "address", "gpu_count", "telemetry_error", "llama_server_error"}  # fmt: skip


@pytest.fixture
def viewer_client(users):
    client = APIClient()
    client.force_login(users["viewer"])
    return client


def test_hosts_list_their_state_worker_and_gpu_count(viewer_client, users, tiny_model):
    up, down = make_cluster(tiny_model, owner=users["operator"], count=2, gpus_per_host=3)
    body = viewer_client.get("/api/v1/hosts/").json()
    assert body["count"] == 2 and set(body) >= {"count", "next", "previous", "results"}
    first, second = body["results"]
    assert set(first) == HOST_FIELDS
    assert first["name"] == "box-0" and first["state"] == "up" and first["down_reason"] is None
    assert first["worker_hostname"] == "node0.example" and first["worker_pid"] == 1000
    assert first["address"] == "10.0.0.1" and first["gpu_count"] == 3  # not the replaced one
    assert second["state"] == "down" and second["down_reason"] == down.down_reason()
    assert second["down_reason"].startswith("host box-1 not heard from since ")

    assert viewer_client.get(f"/api/v1/hosts/{down.pk}/").json()["state"] == "down"
    assert [h["name"] for h in viewer_client.get("/api/v1/hosts/?state=down").json()["results"]] == ["box-1"]
    make_gpus(1, host_name="fresh")  # never heard from: down, in the list and in the filter alike
    fresh = viewer_client.get("/api/v1/hosts/?state=down").json()["results"]
    assert [(h["name"], h["state"], h["down_reason"]) for h in fresh] == [
        ("box-1", "down", down.down_reason()), ("fresh", "down", "host fresh not heard from yet")
    ]  # fmt: skip
    assert [h["name"] for h in viewer_client.get("/api/v1/hosts/?state=up").json()["results"]] == ["box-0"]
    assert viewer_client.get("/api/v1/hosts/?state=sideways").status_code == 400
    assert viewer_client.get("/api/v1/hosts/?limit=1").json()["results"][0]["name"] == "box-0"


def test_hosts_are_read_only_and_need_a_role(users, tiny_model):
    make_cluster(tiny_model, count=1)
    client = APIClient()
    assert client.get("/api/v1/hosts/").status_code in (401, 403)
    client.force_login(users["outsider"])
    assert client.get("/api/v1/hosts/").status_code == 403
    client.force_login(users["admin"])
    assert client.post("/api/v1/hosts/", {"name": "x"}).status_code == 405


def test_gpus_and_instances_carry_their_hosts_state(viewer_client, users, tiny_model):
    _, down = make_cluster(tiny_model, owner=users["operator"], count=2)
    gpus = viewer_client.get("/api/v1/gpus/").json()["results"]
    assert {(g["host"], g["host_state"]) for g in gpus} == {("box-0", "up"), ("box-1", "down")}
    assert {g["host_down_reason"] for g in gpus if g["host"] == "box-0"} == {None}
    assert {g["host_down_reason"] for g in gpus if g["host"] == "box-1"} == {down.down_reason()}

    unknown = down.instances.first()
    data = viewer_client.get(f"/api/v1/instances/{unknown.pk}/").json()
    assert data["status"] == "unknown" and data["host_state"] == "down"
    assert data["host_down_reason"] == down.down_reason() and data["memory_used_mb"] == 5123
    listed = viewer_client.get("/api/v1/instances/?host=box-0").json()["results"]
    assert {(i["status"], i["host_state"], i["host_down_reason"]) for i in listed} == {
        ("running", "up", None), ("stopping", "up", None)
    }  # fmt: skip


def _queries(client, url) -> int:
    with CaptureQueriesContext(connection) as captured:
        response = client.get(url)
    assert response.status_code == 200, response.content[:300]
    return len(captured)


@pytest.mark.parametrize("url", ["/api/v1/hosts/", "/api/v1/gpus/", "/api/v1/instances/"])
def test_list_queries_do_not_grow_with_hosts(users, tiny_model, url):
    client = APIClient()
    client.force_login(users["admin"])
    make_cluster(tiny_model, owner=users["operator"], start=0, count=2)
    two = _queries(client, url)
    make_cluster(tiny_model, owner=users["operator2"], start=2, count=4)
    six = _queries(client, url)
    assert six == two, f"{url}: {two} queries at 2 hosts, {six} at 6"
