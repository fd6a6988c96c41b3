"""Login throttling (django-axes): locked per (username, address), audited, and a way back in."""

from datetime import timedelta

import pytest
from axes.models import AccessAttempt
from django.core.management import call_command
from django.test import Client

from models_app.models import InstanceEvent

STRANGER = "203.0.113.7"
OWNER = "198.51.100.20"


@pytest.fixture(autouse=True)
def _limits(settings):
    settings.AXES_FAILURE_LIMIT = 3
    settings.AXES_COOLOFF_TIME = timedelta(seconds=600)


def login(address, username, password, path="/accounts/login/"):
    client = Client(REMOTE_ADDR=address)
    return client, client.post(path, {"username": username, "password": password})


def lock(username, address=STRANGER, path="/accounts/login/"):
    for attempt in range(3):
        _, response = login(address, username, "wrong", path)
        # The form again with "wrong password", until the failure that reaches the limit locks.
        assert response.status_code == (429 if attempt == 2 else 200)


def test_lockout_is_per_username_and_address(users):
    lock("admin")
    client, response = login(STRANGER, "admin", "pw-admin-123")  # the right password, but locked
    assert response.status_code == 429 and "Too many failed logins" in response.content.decode()
    assert "_auth_user_id" not in client.session

    # The owner, from their own address, still gets in: a stranger cannot lock the admin out.
    client, response = login(OWNER, "admin", "pw-admin-123")
    assert response.status_code == 302 and client.session["_auth_user_id"] == str(users["admin"].pk)
    # Another account from the stranger's address is not affected either.
    assert login(STRANGER, "viewer", "pw-viewer-123")[1].status_code == 302


def test_failures_and_the_lock_are_audit_events_once(users):
    lock("operator")
    for _ in range(3):  # refused while locked: neither counted nor audited one by one
        assert login(STRANGER, "operator", "wrong")[1].status_code == 429
    kinds = list(InstanceEvent.objects.order_by("id").values_list("kind", flat=True))
    assert kinds == ["login_failed"] * 3 + ["login_locked"]  # the failure that locked comes first
    assert STRANGER in InstanceEvent.objects.filter(kind="login_failed").first().detail
    locked = InstanceEvent.objects.get(kind="login_locked")
    assert "'operator'" in locked.detail and STRANGER in locked.detail and "10 min" in locked.detail


def test_lock_ends_after_the_cool_off_and_success_forgets_failures(users, settings):
    lock("operator")
    assert login(STRANGER, "operator", "pw-operator-123")[1].status_code == 429
    AccessAttempt.objects.update(
        attempt_time=AccessAttempt.objects.get().attempt_time - timedelta(seconds=601)
    )
    assert login(STRANGER, "operator", "pw-operator-123")[1].status_code == 302
    assert not AccessAttempt.objects.exists()  # reset on success


def test_admin_login_is_throttled_too(users):
    lock("admin", path="/admin/login/")
    _, response = login(STRANGER, "admin", "pw-admin-123", path="/admin/login/")
    assert response.status_code == 429
    _, response = login(OWNER, "admin", "pw-admin-123", path="/admin/login/")
    assert response.status_code == 302


@pytest.mark.parametrize("command", [["axes_reset_username", "admin"], ["axes_reset"]])
def test_reset_command_lets_the_locked_pair_back_in(users, command):
    lock("admin")
    assert login(STRANGER, "admin", "pw-admin-123")[1].status_code == 429
    call_command(*command)
    assert login(STRANGER, "admin", "pw-admin-123")[1].status_code == 302


def test_forwarded_for_counts_only_behind_a_configured_proxy(users, settings):
    # Without a trusted proxy, X-Forwarded-For is the caller's own words: the lock follows REMOTE_ADDR.
    for n in range(3):
        Client(REMOTE_ADDR=STRANGER, HTTP_X_FORWARDED_FOR=f"10.0.0.{n}").post(
            "/accounts/login/", {"username": "admin", "password": "wrong"}
        )
    assert login(STRANGER, "admin", "pw-admin-123")[1].status_code == 429

    # Behind one proxy, the address the proxy appended is the client; what the client wrote before it is not.
    settings.PROXY_COUNT = 1
    proxy = "127.0.0.1"
    for _ in range(3):
        Client(REMOTE_ADDR=proxy, HTTP_X_FORWARDED_FOR=f"1.2.3.4, {STRANGER}").post(
            "/accounts/login/", {"username": "viewer", "password": "wrong"}
        )
    right = {"username": "viewer", "password": "pw-viewer-123"}
    assert (
        Client(REMOTE_ADDR=proxy, HTTP_X_FORWARDED_FOR=STRANGER).post("/accounts/login/", right).status_code
        == 429
    )
    assert (
        Client(REMOTE_ADDR=proxy, HTTP_X_FORWARDED_FOR=OWNER).post("/accounts/login/", right).status_code
        == 302
    )
