"""The policy in the admin: the same rules and audit events as through the API."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone

from models_app.models import InstanceEvent
from policy import reservations
from policy.models import Pin, Quota, Reservation
from tests.api.factories import make_instance

Kind = InstanceEvent.Kind


@pytest.fixture
def admin_client(client, users):
    client.force_login(users["admin"])
    return client


def stamp(moment):
    local = timezone.localtime(moment)
    return {"0": local.strftime("%Y-%m-%d"), "1": local.strftime("%H:%M:%S")}


def test_a_quota_saved_in_the_admin_is_audited_with_its_allowed_models(admin_client, tiny_model):
    group = Group.objects.create(name="nlp")
    answer = admin_client.post(
        "/admin/policy/quota/add/",
        {"group": group.pk, "gpu_memory_mib": "4096", "allowed_models": ["tiny"], "note": ""},
    )
    assert answer.status_code == 302, answer.content.decode()[:2000]
    quota = Quota.objects.get(group=group)
    event = InstanceEvent.objects.get(kind=Kind.QUOTA_CHANGED)
    assert event.detail == (
        "quota of group nlp set: GPU memory 4 096 MiB, GPUs no limit, models loaded no limit, allowed models tiny "
        "(nothing running is unloaded)"
    )
    admin_client.post(
        "/admin/policy/quota/", {"action": "delete_selected", "_selected_action": [quota.pk], "post": "yes"}
    )
    assert not Quota.objects.exists()
    assert InstanceEvent.objects.filter(kind=Kind.QUOTA_CHANGED).count() == 2


def test_a_quota_needs_a_user_or_a_group(admin_client):
    answer = admin_client.post("/admin/policy/quota/add/", {"gpus": "1"})
    assert answer.status_code == 200 and not Quota.objects.exists()


def test_a_conflicting_reservation_is_refused_in_the_admin(admin_client, users, fake_gpus):
    now = timezone.now()
    reservations.create(
        host=fake_gpus.host, start=now + timedelta(hours=1), end=now + timedelta(hours=3), purpose="first",
        actor=users["admin"], gpu_indices=[0], users=[users["operator"]],
    )  # fmt: skip
    form = {
        "host": fake_gpus.host.pk,
        "gpu_indices": "[0]",
        "purpose": "second",
        "notice_minutes": "30",
        "users": [users["operator2"].pk],
        **{f"start_{k}": v for k, v in stamp(now + timedelta(hours=2)).items()},
        **{f"end_{k}": v for k, v in stamp(now + timedelta(hours=4)).items()},
    }
    answer = admin_client.post("/admin/policy/reservation/add/", form)
    assert answer.status_code == 200 and "is already held" in answer.content.decode()
    form["gpu_indices"] = "[1]"
    assert admin_client.post("/admin/policy/reservation/add/", form).status_code == 302
    made = Reservation.objects.get(purpose="second")
    assert made.created_by == users["admin"]
    assert InstanceEvent.objects.filter(kind=Kind.RESERVATION_CHANGED).count() == 2


def test_a_pin_made_in_the_admin_is_the_services(admin_client, users, fake_gpus, tiny_model):
    running = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    stopped = make_instance([fake_gpus.gpus[1]], tiny_model, status="stopped")
    assert (
        admin_client.post("/admin/policy/pin/add/", {"instance": stopped.pk, "reason": ""}).status_code == 200
    )
    answer = admin_client.post("/admin/policy/pin/add/", {"instance": running.pk, "reason": "demo"})
    assert answer.status_code == 302
    pinned = Pin.objects.get()
    assert (pinned.instance, pinned.pinned_by, pinned.reason) == (running, users["admin"], "demo")
    assert admin_client.post(f"/admin/policy/pin/{pinned.pk}/delete/", {"post": "yes"}).status_code == 302
    assert list(InstanceEvent.objects.filter(kind=Kind.PIN_CHANGED).values_list("detail", flat=True)) == [
        f"tiny (#{running.pk}) unpinned",
        f"tiny (#{running.pk}) pinned: demo",
    ]
