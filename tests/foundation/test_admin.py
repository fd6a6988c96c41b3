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
    assert "tiny already runs on GPU 0" in response.content.decode() and GpuInstance.objects.count() == 1


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


# --- the audit trail is append-only -----------------------------------------------------------------


@pytest.fixture
def two_instances(users, fake_gpus, tiny_model):
    """A running instance on GPU 0 and a stopped one on GPU 1, each with two events."""
    from models_app.events import record
    from models_app.models import InstanceEvent
    from tests.api.factories import make_instance

    running = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    stopped = make_instance([fake_gpus.gpus[1]], tiny_model, owner=users["operator"], status="stopped")
    for instance in (running, stopped):
        record(InstanceEvent.Kind.REQUESTED, instance=instance, actor=users["operator"], detail="load")
        record(InstanceEvent.Kind.HEALTHY, instance=instance, detail="up")
    return running, stopped


def test_nobody_deletes_events_in_the_admin(client, users, two_instances):
    from models_app.models import InstanceEvent

    client.force_login(users["admin"])
    event = InstanceEvent.objects.first()
    assert client.get(reverse("admin:models_app_instanceevent_delete", args=[event.pk])).status_code == 403
    assert (
        client.post(
            reverse("admin:models_app_instanceevent_delete", args=[event.pk]), {"post": "yes"}
        ).status_code
        == 403
    )
    changelist = client.get(reverse("admin:models_app_instanceevent_changelist")).content.decode()
    assert "delete_selected" not in changelist
    client.post(
        reverse("admin:models_app_instanceevent_changelist"),
        {"action": "delete_selected", "_selected_action": [event.pk], "post": "yes"},
    )
    assert InstanceEvent.objects.count() == 4
    # Nor change them.
    assert (
        client.post(
            reverse("admin:models_app_instanceevent_change", args=[event.pk]), {"detail": "x"}
        ).status_code
        == 403
    )


def test_an_active_instance_cannot_be_deleted_only_unloaded(client, users, two_instances):
    from models_app.models import GpuInstance

    running, _ = two_instances
    client.force_login(users["admin"])
    change = client.get(reverse("admin:models_app_gpuinstance_change", args=[running.pk])).content.decode()
    assert "deletelink" not in change
    url = reverse("admin:models_app_gpuinstance_delete", args=[running.pk])
    assert client.post(url, {"post": "yes"}).status_code == 403
    response = client.post(
        reverse("admin:models_app_gpuinstance_changelist"),
        {"action": "delete_selected", "_selected_action": [running.pk], "post": "yes"},
    )
    assert response.status_code == 403 and GpuInstance.objects.filter(pk=running.pk).exists()
    changelist = client.get(reverse("admin:models_app_gpuinstance_changelist")).content.decode()
    assert "unload_selected" in changelist


def test_deleting_a_finished_instance_is_an_event_and_keeps_its_events(client, users, two_instances):
    from models_app.models import GpuInstance, InstanceEvent

    _, stopped = two_instances
    kept = set(stopped.events.values_list("id", flat=True))
    client.force_login(users["admin"])
    url = reverse("admin:models_app_gpuinstance_delete", args=[stopped.pk])
    page = client.get(url).content.decode()
    assert "2 event(s) are kept" in page and "Cannot delete" not in page
    assert client.post(url, {"post": "yes"}).status_code == 302

    assert not GpuInstance.objects.filter(pk=stopped.pk).exists()
    assert set(InstanceEvent.objects.filter(id__in=kept, instance=None).values_list("id", flat=True)) == kept
    deleted = InstanceEvent.objects.get(kind="instance_deleted")
    assert deleted.actor == users["admin"] and f"instance #{stopped.pk} (tiny" in deleted.detail
    assert all(f"#{i} " in deleted.detail for i in kept) and "requested by operator" in deleted.detail


def test_only_admins_may_delete_instances(rf, users, two_instances):
    from django.contrib import admin as django_admin

    from models_app.models import GpuInstance

    _, stopped = two_instances
    model_admin = django_admin.site._registry[GpuInstance]
    for name, allowed in [("admin", True), ("operator", False), ("viewer", False)]:
        request = rf.post("/")
        request.user = users[name]
        assert model_admin.has_delete_permission(request, stopped) is allowed
