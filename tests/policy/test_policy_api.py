"""The policy's API: who may read and change quotas, reservations and pins; `GET /api/v1/quota/`; bad input and
conflicts answer 4xx with a reason; every change is an audit event."""

import json
from datetime import timedelta

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone
from rest_framework.test import APIClient

from models_app.models import InstanceEvent
from policy import pins, reservations
from policy.models import Pin, Quota, Reservation
from tests.api.factories import make_instance

Kind = InstanceEvent.Kind


@pytest.fixture
def nlp(users):
    group = Group.objects.create(name="nlp")
    users["operator"].groups.add(group)
    return group


def window(hours=(1, 3)):
    now = timezone.now()
    return {
        "start": (now + timedelta(hours=hours[0])).isoformat(),
        "end": (now + timedelta(hours=hours[1])).isoformat(),
    }


def test_quotas_admins_write_others_read_their_own(client_for, users, nlp, tiny_model):
    admin = client_for("admin")
    made = admin.post(
        "/api/v1/quotas/",
        {"group": "nlp", "gpu_memory_mib": 65536, "allowed_models": ["tiny"]},
        format="json",
    )
    assert made.status_code == 201, made.content
    Quota.objects.create(user=users["operator2"], gpus=1)
    assert client_for("operator").post("/api/v1/quotas/", {"user": "operator", "gpus": 9}).status_code == 403
    listed = client_for("operator").get("/api/v1/quotas/").json()["results"]
    assert [(q["group"], q["gpu_memory_mib"], q["allowed_models"]) for q in listed] == [
        ("nlp", 65536, ["tiny"])
    ]
    assert len(admin.get("/api/v1/quotas/").json()["results"]) == 2
    assert client_for("outsider").get("/api/v1/quotas/").status_code == 403
    changed = admin.patch(f"/api/v1/quotas/{made.json()['id']}/", {"gpu_memory_mib": 32768}, format="json")
    assert changed.status_code == 200
    assert admin.delete(f"/api/v1/quotas/{made.json()['id']}/").status_code == 204
    assert InstanceEvent.objects.filter(kind=Kind.QUOTA_CHANGED).count() == 3


@pytest.mark.parametrize(
    "body, field",
    [
        ({"gpus": 2}, "non_field_errors"),  # neither user nor group
        ({"user": "operator", "group": "nlp"}, "non_field_errors"),
        ({"user": "nobody"}, "user"),
        ({"group": "nlp", "gpus": 0}, "gpus"),
        ({"group": "nlp", "gpu_memory_mib": -1}, "gpu_memory_mib"),
        ({"group": "nlp", "allowed_models": ["no-such-model"]}, "allowed_models"),
    ],
)
def test_bad_quotas_are_400(client_for, nlp, body, field):
    answer = client_for("admin").post("/api/v1/quotas/", body, format="json")
    assert answer.status_code == 400 and field in answer.json(), answer.content


@pytest.mark.parametrize("text", ["tiny\x00", "\ud800"], ids=["nul", "lone-surrogate"])
@pytest.mark.parametrize("field", ["allowed_models", "user", "group"])
@pytest.mark.parametrize("body_format", ["multipart", "json"])
def test_names_the_database_cannot_take_are_400_and_change_nothing(
    client_for, nlp, tiny_model, text, field, body_format
):
    """A looked-up name with a NUL character (PostgreSQL refuses it: CI's schemathesis run met a 500 on a
    multipart PATCH) or a lone surrogate is a 400 naming the field, on every database."""
    admin = client_for("admin")
    quota = admin.post("/api/v1/quotas/", {"group": "nlp", "gpus": 1}, format="json").json()
    if body_format == "multipart" and text == "\ud800":
        pytest.skip("a multipart body is bytes: a lone surrogate cannot be encoded into it")
    value = [text] if field == "allowed_models" else text
    url = f"/api/v1/quotas/{quota['id']}/"
    if body_format == "json":  # as a client sends it: the lone surrogate escaped (json.dumps's ASCII)
        answer = admin.patch(url, json.dumps({field: value}), content_type="application/json")
    else:
        answer = admin.patch(url, {field: value}, format="multipart")
    assert answer.status_code == 400 and field in answer.json(), answer.content
    reservation = {"host": text, "gpu_indices": [0], "groups": ["nlp"], "purpose": "x", **window()}
    answer = admin.post("/api/v1/reservations/", json.dumps(reservation), content_type="application/json")
    assert answer.status_code == 400 and "host" in answer.json(), answer.content
    assert Quota.objects.get().gpus == 1 and not Quota.objects.get().allowed_models.exists()
    assert not Reservation.objects.exists()


def test_one_quota_per_group(client_for, nlp):
    admin = client_for("admin")
    assert admin.post("/api/v1/quotas/", {"group": "nlp", "gpus": 1}).status_code == 201
    assert admin.post("/api/v1/quotas/", {"group": "nlp", "gpus": 2}).status_code == 400


def test_quota_usage_your_own_and_admins_anyones(client_for, users, nlp, fake_gpus, tiny_model):
    Quota.objects.create(group=nlp, gpu_memory_mib=4096, models_loaded=1)
    make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"], memory_used_mb=3000)
    make_instance([fake_gpus.gpus[1]], tiny_model, owner=users["operator"], memory_used_mb=500)
    mine = client_for("operator").get("/api/v1/quota/").json()
    assert mine["limits"] == {"gpu_memory_mib": 4096, "gpus": None, "models_loaded": 1}
    assert mine["used"] == {"gpu_memory_mib": 3500, "gpus": 2, "models_loaded": 2}
    assert [i["standing"] for i in mine["instances"]] == ["guaranteed", "borrowed"]
    assert client_for("viewer").get("/api/v1/quota/").json()["source"] == "no quota"
    assert client_for("viewer").get("/api/v1/quota/?user=operator").status_code == 403
    assert client_for("admin").get("/api/v1/quota/?user=operator").json()["used"]["models_loaded"] == 2
    assert client_for("admin").get("/api/v1/quota/?user=ghost").status_code == 400
    assert APIClient().get("/api/v1/quota/").status_code in (401, 403)


def test_reservations_created_by_admins_conflicts_409(client_for, users, nlp, fake_gpus):
    admin = client_for("admin")
    body = {"host": "testhost", "gpu_indices": [0], "groups": ["nlp"], "purpose": "fine-tune", **window()}
    made = admin.post("/api/v1/reservations/", body, format="json")
    assert made.status_code == 201, made.content
    assert made.json()["holders"] == "group nlp" and made.json()["created_by"] == "admin"
    assert client_for("operator").post("/api/v1/reservations/", body, format="json").status_code == 403
    clash = admin.post("/api/v1/reservations/", {**body, **window((2, 5))}, format="json")
    assert clash.status_code == 409
    assert clash.json()["code"] == "reservation_conflict"
    assert "GPU 0 of testhost is already held" in clash.json()["detail"]
    # the week view: windows overlapping a span
    since = (timezone.now() + timedelta(hours=2)).isoformat()
    listed = (
        client_for("viewer")
        .get("/api/v1/reservations/", {"since": since, "host": "testhost"})
        .json()["results"]
    )
    assert [r["id"] for r in listed] == [made.json()["id"]]
    later = (timezone.now() + timedelta(hours=4)).isoformat()
    assert client_for("viewer").get("/api/v1/reservations/", {"since": later}).json()["results"] == []
    assert client_for("viewer").get("/api/v1/reservations/", {"until": "yesterday"}).status_code == 400
    assert admin.delete(f"/api/v1/reservations/{made.json()['id']}/").status_code == 204
    assert not Reservation.objects.exists()
    assert InstanceEvent.objects.filter(kind=Kind.RESERVATION_CHANGED).count() == 2


@pytest.mark.parametrize(
    "change",
    [
        {"gpu_indices": [9]},  # no such GPU
        {"gpu_indices": [0], "memory_mib": 100},  # both
        {"gpu_indices": []},  # neither
        {"users": [], "groups": []},  # nobody holds it
        {"host": "nohost"},
        {"gpu_indices": [-1]},
        {"notice_minutes": -5},
        {"start": "2026-13-45T00:00:00Z"},
    ],
)
def test_bad_reservations_are_400(client_for, nlp, fake_gpus, change):
    body = {"host": "testhost", "gpu_indices": [0], "groups": ["nlp"], "purpose": "x", **window(), **change}
    answer = client_for("admin").post("/api/v1/reservations/", body, format="json")
    assert answer.status_code == 400, answer.content


def test_reservation_end_before_start_is_400(client_for, nlp, fake_gpus):
    body = {"host": "testhost", "gpu_indices": [0], "groups": ["nlp"], "purpose": "x", **window((3, 1))}
    answer = client_for("admin").post("/api/v1/reservations/", body, format="json")
    assert answer.status_code == 400 and "end" in answer.json()


def test_pins_by_admins(client_for, users, fake_gpus, tiny_model):
    running = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    stopped = make_instance([fake_gpus.gpus[1]], tiny_model, status="stopped")
    admin = client_for("admin")
    assert client_for("operator").post("/api/v1/pins/", {"instance": running.pk}).status_code == 403
    made = admin.post("/api/v1/pins/", {"instance": running.pk, "reason": "demo"})
    assert made.status_code == 201
    assert made.json()["pinned_by"] == "admin" and made.json()["active"] is True
    again = admin.post("/api/v1/pins/", {"instance": running.pk})
    assert again.status_code == 409 and again.json()["code"] == "busy"
    assert admin.post("/api/v1/pins/", {"instance": stopped.pk}).status_code == 400
    assert admin.post("/api/v1/pins/", {"instance": 999999}).status_code == 400
    assert [p["instance"] for p in client_for("viewer").get("/api/v1/pins/").json()["results"]] == [
        running.pk
    ]
    assert admin.delete(f"/api/v1/pins/{made.json()['id']}/").status_code == 204
    assert not Pin.objects.exists()
    assert InstanceEvent.objects.filter(kind=Kind.PIN_CHANGED, instance=running).count() == 2


def test_lowering_a_quota_unloads_nothing(client_for, users, nlp, fake_gpus, tiny_model, sent):
    running = make_instance(fake_gpus.gpus, tiny_model, owner=users["operator"], memory_used_mb=5000)
    made = client_for("admin").post("/api/v1/quotas/", {"group": "nlp", "gpu_memory_mib": 1000}).json()
    assert made["gpu_memory_mib"] == 1000
    running.refresh_from_db()
    assert running.status == "running" and sent == []
    assert [i["standing"] for i in client_for("operator").get("/api/v1/quota/").json()["instances"]] == [
        "borrowed"
    ]


def test_the_lists_cost_a_fixed_number_of_queries(
    client_for, users, nlp, fake_gpus, tiny_model, django_assert_max_num_queries
):
    now = timezone.now()
    for hour in range(6):
        reservations.create(
            host=fake_gpus.host, start=now + timedelta(hours=hour), end=now + timedelta(hours=hour + 1),
            purpose=f"r{hour}", actor=users["admin"], gpu_indices=[0], users=[users["operator"]], groups=[nlp],
        )  # fmt: skip
    pins.pin(make_instance([fake_gpus.gpus[1]], tiny_model), actor=users["admin"])
    client = client_for("viewer")
    with django_assert_max_num_queries(8):
        assert len(client.get("/api/v1/reservations/").json()["results"]) == 6
    with django_assert_max_num_queries(6):
        assert len(client.get("/api/v1/pins/").json()["results"]) == 1
