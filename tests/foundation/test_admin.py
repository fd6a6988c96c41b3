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
