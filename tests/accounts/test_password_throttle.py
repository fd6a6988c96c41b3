"""The current password asked for when changing one's own is throttled like logins (issue 17, item 4):
12 wrong `old_password` values answered 200 each and the 13th (right) changed the password; the API's
`current_password` the same. Now: after LOGIN_MAX_FAILURES wrong ones the change is locked for that user
(429, a clear message), whichever door, and the failures are in the audit trail."""

from datetime import timedelta

import pytest
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from rest_framework.test import APIClient

from accounts.models import PasswordCheckFailures
from models_app.models import InstanceEvent

pytestmark = pytest.mark.django_db

NEW = "a-new-long-password-1"


@pytest.fixture(autouse=True)
def three_tries(settings):
    settings.LOGIN_MAX_FAILURES = 3
    settings.LOGIN_LOCKOUT_SECONDS = 600


def web(user) -> tuple[Client, callable]:
    client = Client(REMOTE_ADDR="10.0.0.7")
    client.force_login(user)

    def change(old: str):
        form = {"old_password": old, "new_password1": NEW, "new_password2": NEW}
        return client.post(reverse("password-change"), form)

    return client, change


def api(user) -> callable:
    client = APIClient()
    client.force_login(user)

    def change(current: str):
        body = {"password": NEW, "current_password": current}
        return client.patch(f"/api/v1/users/{user.pk}/", body, format="json")

    return change


def events(kind: str) -> list[str]:
    return list(InstanceEvent.objects.filter(kind=kind).order_by("id").values_list("detail", flat=True))


def test_the_web_form_locks_after_three_wrong_passwords(users):
    viewer = users["viewer"]
    _, change = web(viewer)
    assert [change(f"guess-{n}").status_code for n in range(3)] == [200, 200, 200]
    response = change("pw-viewer-123")  # the right one, too late
    assert response.status_code == 429
    assert (
        "too many wrong passwords: changing your password is locked for 10 min" in response.content.decode()
    )
    viewer.refresh_from_db()
    assert viewer.check_password("pw-viewer-123")
    failed = events("login_failed")
    assert len(failed) == 3
    assert (
        failed[0]
        == "username 'viewer': wrong current password (web form, changing the password) from 10.0.0.7"
    )
    assert events("login_locked") == [
        "username 'viewer': password change locked from 10.0.0.7 for 10 min after 3 wrong current passwords"
    ]
    assert InstanceEvent.objects.filter(kind="login_failed", actor=viewer).count() == 3
    assert change("guess-4").status_code == 429 and len(events("login_failed")) == 3  # not counted


def test_the_api_locks_after_three_wrong_passwords(users):
    admin = users["admin"]
    change = api(admin)
    for n in range(3):
        response = change(f"guess-{n}")
        assert response.status_code == 400 and response.json()["current_password"] == ["wrong password"]
    response = change("pw-admin-123")
    assert response.status_code == 429, response.content
    assert "changing your password is locked" in response.json()["detail"]
    assert 590 <= int(response["Retry-After"]) <= 600
    admin.refresh_from_db()
    assert admin.check_password("pw-admin-123")
    assert "(API, changing the password)" in events("login_failed")[0]


def test_the_count_is_per_user_across_doors(users):
    admin = users["admin"]
    client, change_on_web = web(admin)
    assert change_on_web("guess-1").status_code == 200
    assert api(admin)("guess-2").status_code == 400
    form = {"old_password": "guess-3", "new_password1": NEW, "new_password2": NEW}
    assert client.post(reverse("admin:password_change"), form).status_code == 200
    assert change_on_web("pw-admin-123").status_code == 429
    assert api(admin)("pw-admin-123").status_code == 429
    # Another user's count is their own.
    _, viewer_changes = web(users["viewer"])
    assert viewer_changes("pw-viewer-123").status_code == 302


def test_a_right_password_clears_the_count(users):
    _, change = web(users["operator"])
    assert change("guess-1").status_code == 200
    assert change("guess-2").status_code == 200
    assert change("pw-operator-123").status_code == 302
    assert PasswordCheckFailures.objects.get(user=users["operator"]).failures == 0


def test_the_lock_ends_after_its_time(users):
    viewer = users["viewer"]
    _, change = web(viewer)
    for n in range(3):
        change(f"guess-{n}")
    assert change("pw-viewer-123").status_code == 429
    PasswordCheckFailures.objects.filter(user=viewer).update(
        locked_until=timezone.now() - timedelta(seconds=1)
    )
    assert change("pw-viewer-123").status_code == 302
    viewer.refresh_from_db()
    assert viewer.check_password(NEW)


def test_old_failures_are_forgotten(users):
    _, change = web(users["viewer"])
    change("guess-1")
    change("guess-2")
    PasswordCheckFailures.objects.update(last_failure_at=timezone.now() - timedelta(seconds=601))
    assert change("guess-3").status_code == 200  # counts as the first again: no lock
    assert PasswordCheckFailures.objects.get().failures == 1


def test_the_admins_own_change_password_page_is_throttled_too(users):
    admin = users["admin"]
    client = Client()
    client.force_login(admin)
    url = reverse("admin:password_change")
    form = {"old_password": "wrong", "new_password1": NEW, "new_password2": NEW}
    assert [client.post(url, form).status_code for _ in range(3)] == [200, 200, 200]
    form["old_password"] = "pw-admin-123"
    response = client.post(url, form)
    assert response.status_code == 429 and "changing your password is locked" in response.content.decode()
    admin.refresh_from_db()
    assert admin.check_password("pw-admin-123")
