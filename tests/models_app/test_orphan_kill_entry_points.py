"""An admin kills an orphan llama-server from the API, the web UI or the Django admin; nobody else can."""

import pytest
from django.urls import reverse

pytestmark = pytest.mark.django_db


@pytest.fixture
def orphan_on_gpu0(fake_gpus):
    gpu = fake_gpus.gpus[0]
    gpu.processes = [
        {"pid": 4321, "name": "llama-server", "used_mib": 100, "owner": "orphan", "instance_id": None}
    ]
    gpu.save()
    return gpu


@pytest.mark.parametrize(("who", "expected"), [("admin", 202), ("operator", 403), ("viewer", 403)])
def test_api(client, users, orphan_on_gpu0, sent, who, expected):
    client.force_login(users[who])
    response = client.post(reverse("orphan-kill-api", args=[orphan_on_gpu0.pk, 4321]))
    assert response.status_code == expected
    assert sent == (
        [
            (
                "kill_orphan",
                ["testhost", 4321, users["admin"].pk, orphan_on_gpu0.pk],
                {"queue": "host.testhost"},
            )
        ]
        if expected == 202
        else []
    )


def test_api_anonymous_and_unknown_gpu(client, users, orphan_on_gpu0, sent):
    assert client.post(reverse("orphan-kill-api", args=[orphan_on_gpu0.pk, 4321])).status_code in (401, 403)
    client.force_login(users["admin"])
    assert client.post(reverse("orphan-kill-api", args=[999, 4321])).status_code == 404
    assert sent == []


def test_web(client, users, orphan_on_gpu0, sent):
    client.force_login(users["operator"])
    assert client.post(reverse("orphan-kill", args=[orphan_on_gpu0.pk, 4321])).status_code == 403
    client.force_login(users["admin"])
    assert client.post(reverse("orphan-kill", args=[orphan_on_gpu0.pk, 4321])).status_code in (200, 302)
    assert [name for name, *_ in sent] == ["kill_orphan"]


def test_admin_action(client, users, orphan_on_gpu0, sent):
    client.force_login(users["admin"])
    changelist = reverse("admin:gpus_gpu_changelist")
    assert "4321" in client.get(changelist).content.decode()
    response = client.post(
        changelist, {"action": "kill_orphans", "_selected_action": [orphan_on_gpu0.pk]}, follow=True
    )
    assert "Kill requested for 1 orphan process" in response.content.decode()
    assert sent == [
        ("kill_orphan", ["testhost", 4321, users["admin"].pk, orphan_on_gpu0.pk], {"queue": "host.testhost"})
    ]
