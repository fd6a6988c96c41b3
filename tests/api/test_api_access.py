"""Who may do what: every API endpoint x every kind of caller, with the expected status each time."""

import pytest
from rest_framework.test import APIClient

from accounts.models import ApiToken
from tests.api.factories import make_instance

IDENTITIES = ["anonymous", "outsider", "viewer", "operator", "operator2", "admin",
              "operator_token", "expired_token", "revoked_token"]  # fmt: skip

# Who is refused before any rule applies: no credentials or a dead token -> 401; no role -> 403.
BASE = {"anonymous": 401, "expired_token": 401, "revoked_token": 401, "outsider": 403}
ROLE_RULES = {
    # rule: (viewer, operator (owns the instance), operator2 (does not), admin)
    "read": (200, 200, 200, 200),
    "load": (403, 202, 202, 202),
    "manage": (403, 202, 403, 202),
    "admin_read": (403, 403, 403, 200),
    "session_create": (201, 201, 201, 201),  # and 403 for a token: a token cannot mint tokens
    "admin_create": (403, 403, 403, 201),
    "admin_change": (403, 403, 403, 200),
    "admin_delete": (403, 403, 403, 204),
    "compat_load": (403, 200, 200, 200),
    "compat_unload": (403, 200, 403, 200),
    "health": ({200, 503}, {200, 503}, {200, 503}, {200, 503}),
}

# (name, method, path (formatted with gpu/instance/token ids), body, rule)
ENDPOINTS = [
    ("gpu-list", "get", "/api/v1/gpus/", None, "read"),
    ("gpu-detail", "get", "/api/v1/gpus/{gpu}/", None, "read"),
    ("model-list", "get", "/api/v1/models/", None, "read"),
    ("model-detail", "get", "/api/v1/models/tiny/", None, "read"),
    (
        "model-create",
        "post",
        "/api/v1/models/",
        {"id": "tiny3", "name": "T3", "path": "{model_path}"},
        "admin_create",
    ),
    ("model-update", "patch", "/api/v1/models/tiny2/", {"name": "Renamed"}, "admin_change"),
    ("model-delete", "delete", "/api/v1/models/tiny2/", None, "admin_delete"),
    ("instance-list", "get", "/api/v1/instances/", None, "read"),
    ("instance-detail", "get", "/api/v1/instances/{instance}/", None, "read"),
    ("instance-log", "get", "/api/v1/instances/{instance}/log/", None, "read"),
    ("instance-load", "post", "/api/v1/instances/", {"model_id": "tiny", "gpu_id": "1"}, "load"),
    ("instance-unload", "post", "/api/v1/instances/{instance}/unload/", None, "manage"),
    ("instance-switch", "post", "/api/v1/instances/{instance}/switch/", {"model_id": "tiny2"}, "manage"),
    ("event-list", "get", "/api/v1/events/", None, "read"),
    ("token-list", "get", "/api/v1/tokens/", None, "read"),
    ("token-create", "post", "/api/v1/tokens/", {"name": "script"}, "session_create"),
    ("user-list", "get", "/api/v1/users/", None, "admin_read"),
    (
        "user-create",
        "post",
        "/api/v1/users/",
        {"username": "newbie", "password": "long-enough-pw-42", "role": "viewer"},
        "admin_create",
    ),  # fmt: skip
    ("user-me", "get", "/api/v1/users/me/", None, "read"),
    ("health", "get", "/api/v1/health/", None, "health"),
    ("compat-gpu-status", "get", "/api/v1/gpu/status", None, "read"),
    ("compat-models-status", "get", "/api/v1/models/status", None, "read"),
    ("compat-load", "post", "/api/v1/models/load", {"model_id": "tiny", "gpu_id": "1"}, "compat_load"),
    ("compat-unload", "post", "/api/v1/models/unload", {"gpu_id": "0"}, "compat_unload"),
]


def expected_status(identity, rule):
    if identity in BASE:
        return BASE[identity]
    if identity == "operator_token" and rule == "session_create":
        return 403
    column = {"viewer": 0, "operator": 1, "operator_token": 1, "operator2": 2, "admin": 3}[identity]
    return ROLE_RULES[rule][column]


def client_as(identity, users, bearer, past):
    client = APIClient()
    if identity == "operator_token":
        client.credentials(HTTP_AUTHORIZATION=bearer(users["operator"]))
    elif identity == "expired_token":
        client.credentials(HTTP_AUTHORIZATION=bearer(users["operator"], expires_at=past))
    elif identity == "revoked_token":
        client.credentials(HTTP_AUTHORIZATION=bearer(users["operator"], revoked_at=past))
    elif identity != "anonymous":
        client.force_login(users[identity])
    return client


@pytest.mark.parametrize("identity", IDENTITIES)
@pytest.mark.parametrize(("name", "method", "path", "body", "rule"), ENDPOINTS, ids=[e[0] for e in ENDPOINTS])
def test_access_matrix(
    identity, name, method, path, body, rule, users, fake_gpus, tiny_model, second_model, bearer, past,
    django_capture_on_commit_callbacks,
):  # fmt: skip
    instance = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    values = {"gpu": fake_gpus.gpus[0].pk, "instance": instance.pk, "model_path": tiny_model.path}
    url = path.format(**values)
    if body:
        body = {k: v.format(**values) if isinstance(v, str) else v for k, v in body.items()}
    client = client_as(identity, users, bearer, past)

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = getattr(client, method)(url, body, format="json")

    expected = expected_status(identity, rule)
    allowed = expected if isinstance(expected, set) else {expected}
    assert response.status_code in allowed, (identity, name, response.status_code, response.content[:300])
    if rule in ("load", "manage", "compat_load", "compat_unload") and response.status_code < 300:
        assert callbacks, "an accepted load/unload/switch enqueues work on commit"
    if response.status_code in (401, 403) and method != "get":
        assert not callbacks, "a refused request enqueues nothing"


def test_tokens_list_shows_only_own_tokens(users, bearer):
    ApiToken.issue(users["viewer"], "viewer's")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=bearer(users["operator"]))
    names = [t["name"] for t in client.get("/api/v1/tokens/").json()["results"]]
    assert names == ["test token"]
