"""A database outage (issue 16, item 7): every request that needs the database answers 503 with the reason,
JSON on the API, wherever the error surfaces (DRF's token authentication, the session middleware, a view),
never Django's HTML "Server Error (500)". The database is made unreachable for real: the connection is
pointed at a PostgreSQL port nothing listens on, or at an SQLite file in a folder that does not exist."""

import contextlib
import copy
import socket

import pytest
from django.db import connection
from rest_framework.test import APIClient

pytestmark = pytest.mark.django_db(transaction=True)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # closed again when the block ends: connections are refused


def _close_pool():
    if getattr(connection, "pool", None) is not None:
        connection.close_pool()  # a pool keeps its connections: the next one is made with the new settings


@contextlib.contextmanager
def database_down():
    saved = copy.deepcopy(connection.settings_dict)
    connection.close()
    _close_pool()
    if connection.vendor == "sqlite":
        connection.settings_dict["NAME"] = "/nonexistent-llamacontroller-folder/db.sqlite3"
    else:
        connection.settings_dict.update(HOST="127.0.0.1", PORT=str(_closed_port()))
        pool = connection.settings_dict.get("OPTIONS", {}).get("pool")
        if isinstance(pool, dict):
            pool["timeout"] = 1  # a borrower waits this long for a connection before the error
    try:
        yield
    finally:
        connection.close()
        _close_pool()
        connection.settings_dict.clear()
        connection.settings_dict.update(saved)


@pytest.fixture
def token_client(users, bearer):
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=bearer(users["admin"]))
    return client


@pytest.fixture
def session_client(users):
    client = APIClient(raise_request_exception=False)
    client.force_login(users["admin"])
    return client


def _assert_json_503(response):
    assert response.status_code == 503, (response.status_code, response.content[:300])
    assert response["Content-Type"] == "application/json"
    body = response.json()
    assert body["code"] == "unavailable"
    assert body["detail"].startswith("the database is unavailable: "), body
    assert response["Retry-After"]


@pytest.mark.parametrize(
    ("method", "url"),
    [
        ("get", "/api/v1/gpus/"),
        ("get", "/api/v1/instances/"),
        ("get", "/api/v1/hosts/"),
        ("post", "/api/v1/instances/"),
        ("get", "/api/v1/gpu/status"),  # the seed-compatible API
    ],
)
@pytest.mark.parametrize("client_fixture", ["token_client", "session_client"])
def test_the_api_answers_json_503_naming_the_database(request, client_fixture, method, url):
    client = request.getfixturevalue(client_fixture)
    with database_down():
        response = getattr(client, method)(
            url, {"model_id": "tiny"} if method == "post" else None, format="json"
        )
    _assert_json_503(response)


def test_pages_answer_503_saying_the_database_is_unreachable(session_client):
    with database_down():
        response = session_client.get("/events/")
    assert response.status_code == 503, response.content[:300]
    assert b"The database is unreachable" in response.content
    assert b"the database is unavailable: " in response.content


def test_the_api_answers_again_when_the_database_is_back(token_client):
    with database_down():
        _assert_json_503(token_client.get("/api/v1/gpus/"))
    assert token_client.get("/api/v1/gpus/").status_code == 200
