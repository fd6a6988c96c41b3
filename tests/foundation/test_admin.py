"""Every admin changelist and add page: 200 for an admin, a redirect to the login page for anonymous users."""

import pytest
from django.contrib import admin
from django.urls import reverse


def admin_pages():
    pages = []
    for model, model_admin in admin.site._registry.items():
        meta = model._meta
        pages.append((f"admin:{meta.app_label}_{meta.model_name}_changelist", model_admin, "changelist"))
        pages.append((f"admin:{meta.app_label}_{meta.model_name}_add", model_admin, "add"))
    return pages


@pytest.mark.parametrize(("url_name", "model_admin", "kind"), admin_pages(), ids=lambda v: str(v))
def test_admin_pages(client, users, fake_gpus, url_name, model_admin, kind):
    url = reverse(url_name)
    response = client.get(url)
    assert response.status_code == 302
    assert "/admin/login/" in response["Location"]

    client.force_login(users["admin"])
    response = client.get(url)
    if kind == "add" and not model_admin.has_add_permission(response.wsgi_request):
        # Telemetry, instances and events are written by the system, never typed in.
        assert response.status_code == 403
    else:
        assert response.status_code == 200


def test_sample_changelist_does_not_count_the_whole_table(
    admin_client, fake_gpus, django_assert_max_num_queries
):
    from gpus import services

    for _ in range(3):
        services.refresh_host("testhost", [])
    with django_assert_max_num_queries(12):
        response = admin_client.get(reverse("admin:gpus_memorysample_changelist"))
    assert response.status_code == 200


def test_admin_add_instance_loads_through_the_lifecycle(
    client, users, fake_gpus, tiny_model, django_capture_on_commit_callbacks
):
    from models_app.models import GpuInstance

    client.force_login(users["admin"])
    url = reverse("admin:models_app_gpuinstance_add")
    response = client.post(url, {"model": "tiny", "gpu_id": "0,0"})
    assert response.status_code == 200 and "is listed twice" in response.content.decode()
    assert GpuInstance.objects.count() == 0

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = client.post(url, {"model": "tiny", "gpu_id": "0"})
    instance = GpuInstance.objects.get()
    assert response.status_code == 302 and response["Location"].endswith(f"/{instance.pk}/change/")
    assert instance.status == "pending" and instance.owner == users["admin"] and len(callbacks) == 1

    response = client.post(url, {"model": "tiny", "gpu_id": "0"})
    assert "GPU busy" in response.content.decode() and GpuInstance.objects.count() == 1


def test_admin_issues_a_token_shown_once_and_revokes_it(client, users):
    from accounts.models import ApiToken, hash_token
    from models_app.models import InstanceEvent

    client.force_login(users["admin"])
    response = client.post(
        reverse("admin:accounts_apitoken_add"), {"user": users["viewer"].pk, "name": "ci"}, follow=True
    )
    token = ApiToken.objects.get()
    raw = response.content.decode().split("Token for viewer: ")[1].split(" ")[0]
    assert token.user == users["viewer"] and token.token_hash == hash_token(raw)
    event = InstanceEvent.objects.get(kind="token_created")
    assert event.actor == users["admin"] and "for viewer" in event.detail

    client.post(
        reverse("admin:accounts_apitoken_changelist"),
        {"action": "revoke_selected", "_selected_action": [token.pk]},
    )
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert InstanceEvent.objects.filter(kind="token_revoked", actor=users["admin"]).count() == 1
