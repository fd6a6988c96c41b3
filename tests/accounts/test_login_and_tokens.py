"""Login, logout, API tokens (page and API), users and roles. Lockout: test_lockout.py."""

from datetime import timedelta

import pytest
from django.test import Client
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import ApiToken
from models_app.models import InstanceEvent


def login(client, username, password):
    return client.post("/accounts/login/", {"username": username, "password": password})


def test_login_and_logout(client, users):
    response = login(client, "viewer", "pw-viewer-123")
    assert response.status_code == 302 and response["Location"] == "/"
    assert client.get("/").status_code == 200
    assert client.get("/accounts/logout/").status_code == 405  # logging out is a POST
    response = client.post("/accounts/logout/")
    assert response.status_code == 302 and response["Location"] == "/accounts/login/"
    assert client.get("/").status_code == 302


def test_login_page_uses_local_assets(client):
    page = client.get("/accounts/login/").content.decode()
    assert "/static/css/app.css" in page and "cdn" not in page.lower()


def test_admin_site_is_for_admins_only(client, users):
    users["viewer"].is_staff = True  # a stray staff flag does not open the admin
    users["viewer"].save()
    client.force_login(users["viewer"])
    assert client.get("/admin/").status_code == 302
    client.force_login(users["admin"])
    assert client.get("/admin/").status_code == 200


def test_tokens_page_shows_a_new_token_once(client, users):
    client.force_login(users["operator"])
    response = client.post("/accounts/tokens/", {"name": "ci", "expires_in_days": "30"})
    page = response.content.decode()
    token = ApiToken.objects.get(name="ci")
    assert response.status_code == 200 and 'id="issued-token"' in page
    raw = page.split("<code>lc_", 1)[1].split("</code>", 1)[0]
    assert token.expires_at > timezone.now() + timedelta(days=29)
    assert "lc_" + raw not in client.get("/accounts/tokens/").content.decode()  # shown once only
    assert InstanceEvent.objects.filter(kind="token_created", actor=users["operator"]).exists()

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer lc_{raw}")
    assert api.get("/api/v1/users/me/").json()["role"] == "operator"
    token.refresh_from_db()
    assert token.last_used_at is not None

    client.post(f"/accounts/tokens/{token.pk}/revoke/")
    token.refresh_from_db()
    assert token.revoked_at is not None
    assert InstanceEvent.objects.filter(kind="token_revoked").count() == 1
    assert api.get("/api/v1/users/me/").status_code == 401


def test_someone_elses_token_cannot_be_revoked(client, users):
    token, _ = ApiToken.issue(users["viewer"], "mine")
    client.force_login(users["operator"])
    assert client.post(f"/accounts/tokens/{token.pk}/revoke/").status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None


def test_token_api_create_list_revoke(users):
    api = APIClient()
    api.force_login(users["viewer"])
    expires = (timezone.now() + timedelta(days=1)).isoformat()
    response = api.post("/api/v1/tokens/", {"name": "script", "expires_at": expires}, format="json")
    assert response.status_code == 201 and response.json()["token"].startswith("lc_")
    token_id = response.json()["id"]
    listed = api.get("/api/v1/tokens/").json()["results"]
    assert [t["id"] for t in listed] == [token_id] and "token" not in listed[0]
    past = (timezone.now() - timedelta(days=1)).isoformat()
    assert api.post("/api/v1/tokens/", {"name": "old", "expires_at": past}, format="json").status_code == 400
    assert api.delete(f"/api/v1/tokens/{token_id}/").status_code == 204
    assert ApiToken.objects.get(pk=token_id).revoked_at is not None


@pytest.mark.parametrize(("role", "staff"), [("admin", True), ("operator", False), ("viewer", False)])
def test_users_api_sets_role_and_staff(users, role, staff):
    api = APIClient()
    api.force_login(users["admin"])
    response = api.post(
        "/api/v1/users/", {"username": "new", "password": "a-long-password-42", "role": role}, format="json"
    )
    assert response.status_code == 201, response.json()
    assert response.json()["role"] == role and response.json()["is_staff"] is staff
    client = Client()
    assert login(client, "new", "a-long-password-42").status_code == 302
    assert client.get("/admin/").status_code == (200 if staff else 302)

    # Demoting an admin takes the admin site away again.
    user_id = response.json()["id"]
    response = api.patch(f"/api/v1/users/{user_id}/", {"role": "viewer"}, format="json")
    assert response.json()["role"] == "viewer" and response.json()["is_staff"] is False


def test_users_api_refuses_weak_passwords_and_deactivates_on_delete(users):
    api = APIClient()
    api.force_login(users["admin"])
    response = api.post(
        "/api/v1/users/", {"username": "weak", "password": "123", "role": "viewer"}, format="json"
    )
    assert response.status_code == 400 and "password" in response.json()
    response = api.delete(f"/api/v1/users/{users['viewer'].pk}/")
    assert response.status_code == 204
    users["viewer"].refresh_from_db()
    assert users["viewer"].is_active is False


@pytest.mark.django_db
def test_last_use_is_recorded_to_the_minute_without_a_write_per_request(client, users):
    from datetime import timedelta

    from django.db import connection
    from django.test.utils import CaptureQueriesContext
    from django.utils import timezone

    from accounts.models import ApiToken

    token, raw = ApiToken.issue(users["viewer"], "script")
    headers = {"HTTP_AUTHORIZATION": f"Bearer {raw}"}
    assert client.get("/api/v1/gpus/", **headers).status_code == 200
    first = ApiToken.objects.get(pk=token.pk).last_used_at
    with CaptureQueriesContext(connection) as queries:
        assert client.get("/api/v1/gpus/", **headers).status_code == 200
    assert not [q for q in queries.captured_queries if q["sql"].startswith("UPDATE")]
    assert ApiToken.objects.get(pk=token.pk).last_used_at == first

    ApiToken.objects.filter(pk=token.pk).update(last_used_at=timezone.now() - timedelta(minutes=2))
    client.get("/api/v1/gpus/", **headers)
    assert ApiToken.objects.get(pk=token.pk).last_used_at > first
