"""`GET /api/v1/models/{id}/estimate` and `/placement`: any role reads them, flags in the query override the
model's, bad values are 400 naming the parameter."""

import pytest
from rest_framework.test import APIClient

from gpus.models import Gpu


def test_estimate_on_chosen_gpus_with_flags(live, tiny_model, client_for):
    response = client_for("viewer").get(f"/api/v1/models/{tiny_model.pk}/estimate/?gpu_id=0,1&c=8192")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["gpu_ids"] == "0,1" and body["host"] == "testhost" and body["fits"] is True
    assert len(body["per_gpu"]) == 2 and body["breakdown"]["settings"]["n_ctx"] == 8192
    assert body["estimated_mib"] == sum(g["estimated_mib"] for g in body["per_gpu"])
    assert (
        body["summary"].startswith("≈ 6") and " MiB on GPU 0,1" in body["summary"]
    )  # two CUDA contexts and ": fits, 48.0 GiB free" in body["summary"]
    assert body["correction"] == {"factor": 1.0, "loads": 0}
    # KV at 8192 tokens: 2 layers x 8192 x (64 + 64) x 2 bytes = 4 MiB over the two GPUs.
    assert sum(g["kv_mib"] for g in body["breakdown"]["gpus"]) == 4.0


def test_estimate_without_gpus_takes_the_suggestion(live, tiny_model, client_for):
    Gpu.objects.filter(pk=live.gpus[0].pk).update(memory_used_mib=24200)  # too little left for tiny's claim
    body = client_for("viewer").get(f"/api/v1/models/{tiny_model.pk}/estimate/").json()
    assert body["gpu_ids"] == "1"


@pytest.mark.parametrize(
    ("query", "field"),
    [("c=abc", "c"), ("ngl=1.5", "ngl"), ("ctk=q3", "ctk"), ("fa=maybe", "fa"), ("gpu_id=x", "gpu_id"),
     ("gpu_id=7", "gpu_id"), ("ub=0", "ub"), ("host=nowhere", "host"), ("ts=a,b", "ts")],
)  # fmt: skip
def test_bad_values_are_400_naming_the_field(fake_gpus, tiny_model, client_for, query, field):
    response = client_for("viewer").get(f"/api/v1/models/{tiny_model.pk}/estimate/?{query}")
    assert response.status_code == 400, response.json()
    assert field in response.json(), response.json()


def test_placement_ranks_and_explains(live, tiny_model, client_for):
    Gpu.objects.filter(pk=live.gpus[0].pk).update(
        memory_used_mib=12298,
        processes=[{"pid": 1, "name": "train.py", "used_mib": 12288, "owner": "foreign"}],
    )
    body = client_for("viewer").get(f"/api/v1/models/{tiny_model.pk}/placement/?c=1024").json()
    assert body["suggestion"]["gpu_ids"] == "1"
    assert [c["gpu_ids"] for c in body["ranking"]] == ["1", "0"]
    assert body["ranking"][1]["explanation"].endswith("GPU 0: 12.0 GiB used by train.py")
    assert body["ranking"][0]["explanation"].startswith("GPU 1 on testhost: fits with 23.")


def test_roles(live, tiny_model, client_for):
    assert client_for("outsider").get(f"/api/v1/models/{tiny_model.pk}/estimate/").status_code == 403
    assert APIClient().get(f"/api/v1/models/{tiny_model.pk}/placement/").status_code in (401, 403)
    assert client_for("viewer").get("/api/v1/models/nope/estimate/").status_code == 404
