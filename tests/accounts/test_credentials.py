"""Credentials change only with a person present: tokens cannot mint tokens or change users; your own
password needs the current one; every user and token change is an event with its actor."""

import pytest
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse
from rest_framework.test import APIClient

from accounts.models import ApiToken
from models_app.models import InstanceEvent


def token_client(user) -> APIClient:
    _, raw = ApiToken.issue(user, "script")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return api


def session_client(user) -> APIClient:
    api = APIClient()
    api.force_login(user)
    return api


def user_events():
    return list(InstanceEvent.objects.filter(kind="user_changed").order_by("id"))


# --- tokens and users through the API --------------------------------------------------------------


def test_an_admin_token_cannot_set_the_admins_password(users):
    """Seen: PUT /api/v1/users/{id}/ with an admin token set a new password on the admin account."""
    admin = users["admin"]
    api = token_client(admin)
    body = {"username": "admin", "password": "taken-over-123456", "role": "admin", "is_active": True}
    response = api.put(f"/api/v1/users/{admin.pk}/", body, format="json")
    assert response.status_code == 403
    assert "needs a logged-in session" in response.json()["detail"]
    admin.refresh_from_db()
    assert admin.check_password("pw-admin-123") and not user_events()


@pytest.mark.parametrize(
    ("method", "target", "body"),
    [
        ("patch", "viewer", {"role": "admin"}),
        ("patch", "viewer", {"password": "a-new-long-password-1"}),
        ("patch", "viewer", {"is_active": False}),
        ("delete", "viewer", None),
        ("post", None, {"username": "backdoor", "password": "a-long-password-42", "role": "admin"}),
    ],
)
def test_a_token_cannot_change_users(users, method, target, body):
    api = token_client(users["admin"])
    url = f"/api/v1/users/{users[target].pk}/" if target else "/api/v1/users/"
    response = getattr(api, method)(url, body, format="json")
    assert response.status_code == 403 and "logged-in session" in response.json()["detail"]
    users["viewer"].refresh_from_db()
    assert users["viewer"].is_active and users["viewer"].check_password("pw-viewer-123")
    assert not User.objects.filter(username="backdoor").exists() and not user_events()
    # Reading stays open to tokens.
    assert api.get("/api/v1/users/").status_code == 200


def test_a_token_cannot_create_tokens(users):
    api = token_client(users["operator"])
    response = api.post("/api/v1/tokens/", {"name": "child"}, format="json")
    assert response.status_code == 403
    assert "needs a logged-in session" in response.json()["detail"]
    assert ApiToken.objects.filter(user=users["operator"]).count() == 1
    # With a session it works, and revoking with a token still works (it only takes access away).
    assert (
        session_client(users["operator"])
        .post("/api/v1/tokens/", {"name": "child"}, format="json")
        .status_code
        == 201
    )
    child = ApiToken.objects.get(name="child")
    assert api.delete(f"/api/v1/tokens/{child.pk}/").status_code == 204


def test_own_password_needs_the_current_one(users):
    admin = users["admin"]
    api = session_client(admin)
    url = f"/api/v1/users/{admin.pk}/"
    response = api.patch(url, {"password": "a-new-long-password-1"}, format="json")
    assert response.status_code == 400 and response.json()["current_password"] == [
        "required to change your own password"
    ]
    response = api.patch(
        url, {"password": "a-new-long-password-1", "current_password": "nope"}, format="json"
    )
    assert response.status_code == 400 and response.json()["current_password"] == ["wrong password"]
    admin.refresh_from_db()
    assert admin.check_password("pw-admin-123") and not user_events()

    body = {"password": "a-new-long-password-1", "current_password": "pw-admin-123"}
    assert api.patch(url, body, format="json").status_code == 200
    admin.refresh_from_db()
    assert admin.check_password("a-new-long-password-1")
    assert api.get("/api/v1/users/me/").status_code == 200  # still logged in
    [event] = user_events()
    assert event.actor == admin and event.detail == "user 'admin': password set"


def test_every_user_change_through_the_api_is_an_event_with_its_actor(users):
    api = session_client(users["admin"])
    created = api.post(
        "/api/v1/users/",
        {"username": "new", "password": "a-long-password-42", "role": "viewer"},
        format="json",
    ).json()
    url = f"/api/v1/users/{created['id']}/"
    api.patch(url, {"password": "another-long-password-7"}, format="json")  # another user's: no current
    api.patch(url, {"role": "operator"}, format="json")
    api.patch(url, {"email": "new@example.com"}, format="json")  # not a credential: no event
    api.delete(url)
    details = [e.detail for e in user_events()]
    assert details == [
        "user 'new' created with role viewer",
        "user 'new': password set",
        "user 'new': role viewer → operator",
        "user 'new': deactivated",
    ]
    assert {e.actor for e in user_events()} == {users["admin"]}


# --- the admin ------------------------------------------------------------------------------------


def test_admin_token_user_and_expiry_are_fixed_and_renames_are_events(client, users):
    token, _ = ApiToken.issue(users["viewer"], "ci")
    client.force_login(users["admin"])
    url = reverse("admin:accounts_apitoken_change", args=[token.pk])
    page = client.get(url).content.decode()
    assert 'name="user"' not in page and 'name="expires_at_0"' not in page
    response = client.post(
        url,
        {
            "user": users["admin"].pk,
            "name": "ci-renamed",
            "expires_at_0": "2999-01-01",
            "expires_at_1": "00:00",
        },
    )
    assert response.status_code == 302
    token.refresh_from_db()
    assert token.user == users["viewer"] and token.expires_at is None and token.name == "ci-renamed"
    event = InstanceEvent.objects.get(kind="token_changed")
    assert (
        event.actor == users["admin"] and "'ci'" in event.detail and "renamed to 'ci-renamed'" in event.detail
    )

    client.post(reverse("admin:accounts_apitoken_delete", args=[token.pk]), {"post": "yes"})
    assert not ApiToken.objects.exists()
    assert "deleted" in InstanceEvent.objects.get(kind="token_revoked").detail


def test_admin_user_changes_are_events(client, users):
    client.force_login(users["admin"])
    viewer = users["viewer"]
    url = reverse("admin:auth_user_change", args=[viewer.pk])
    from django.contrib.auth.models import Group

    response = client.post(
        url,
        {
            "username": "viewer",
            "email": viewer.email,
            "is_active": "",  # deactivated
            "groups": [Group.objects.get(name="operator").pk],
            "date_joined_0": "2025-01-01",
            "date_joined_1": "00:00:00",
        },
    )
    assert response.status_code == 302, response.content.decode()[:2000]
    [event] = user_events()
    assert event.actor == users["admin"]
    assert event.detail == "user 'viewer': role viewer → operator, deactivated"

    url = reverse("admin:auth_user_password_change", args=[viewer.pk])
    form = {
        "password1": "a-new-long-password-1",
        "password2": "a-new-long-password-1",
        "usable_password": "true",
    }
    assert client.post(url, form).status_code == 302
    assert user_events()[-1].detail == "user 'viewer': password set"


def test_admin_own_password_needs_the_current_one(client, users):
    admin = users["admin"]
    client.force_login(admin)
    # The per-user "set password" form asks for no current password: for your own account it sends you
    # to the admin's "Change password" page, which does.
    response = client.get(reverse("admin:auth_user_password_change", args=[admin.pk]))
    assert response.status_code == 302 and response["Location"] == reverse("admin:password_change")
    form = {
        "old_password": "wrong",
        "new_password1": "a-new-long-password-1",
        "new_password2": "a-new-long-password-1",
    }
    assert client.post(reverse("admin:password_change"), form).status_code == 200
    form["old_password"] = "pw-admin-123"
    assert client.post(reverse("admin:password_change"), form).status_code == 302
    admin.refresh_from_db()
    assert admin.check_password("a-new-long-password-1")
    assert user_events()[-1].actor == admin and "password set" in user_events()[-1].detail


# --- the web --------------------------------------------------------------------------------------


def test_web_password_change_needs_the_current_one_and_is_an_event(users):
    client = Client()
    client.force_login(users["viewer"])
    url = reverse("password-change")
    assert client.get(url).status_code == 200
    form = {
        "old_password": "wrong",
        "new_password1": "a-new-long-password-1",
        "new_password2": "a-new-long-password-1",
    }
    assert client.post(url, form).status_code == 200 and not user_events()
    form["old_password"] = "pw-viewer-123"
    assert client.post(url, form).status_code == 302
    assert client.get("/").status_code == 200  # the session survives its own password change
    [event] = user_events()
    assert event.actor == users["viewer"] and "password set" in event.detail
    assert Client().get(url).status_code == 302  # anonymous: to the login page


def test_admin_user_creation_and_deletion_are_events(client, users):
    client.force_login(users["admin"])
    form = {"username": "temp", "password1": "a-long-password-42", "password2": "a-long-password-42"}
    response = client.post(reverse("admin:auth_user_add"), {**form, "usable_password": "true"})
    assert response.status_code == 302, response.content.decode()[:2000]
    temp = User.objects.get(username="temp")
    client.post(reverse("admin:auth_user_delete", args=[temp.pk]), {"post": "yes"})
    assert not User.objects.filter(username="temp").exists()
    assert [e.detail for e in user_events()] == ["user 'temp' created with role none", "user 'temp' deleted"]
    assert {e.actor for e in user_events()} == {users["admin"]}
