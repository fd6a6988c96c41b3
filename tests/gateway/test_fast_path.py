"""The gateway's fast path (gateway/access.py, gateway/exchange.py, gateway/handler.py): the token and instance
caches, what invalidates them, and the shorter middleware chain of the gateway's routes."""

import json
import time
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from accounts import tokens
from accounts.models import ApiToken
from gateway import access
from gateway.models import UsageRecord
from models_app.models import GpuInstance
from tests.gateway.fakes import request, run

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "stream": False}


def chat(auth):
    status, _, content = request("POST", "/v1/chat/completions", CHAT, auth=auth)
    return status, json.loads(content)


@pytest.fixture
def clock(monkeypatch):
    """Moves the caches' clock forward: `clock(seconds)`."""
    real = time.monotonic
    offset = [0.0]
    monkeypatch.setattr(access.time, "monotonic", lambda: real() + offset[0])

    def advance(seconds):
        offset[0] += seconds

    return advance


@pytest.fixture
def checks(monkeypatch):
    """Counts the token checks against the database."""
    seen = []
    real = tokens.check

    def check(raw):
        seen.append(raw)
        return real(raw)

    monkeypatch.setattr(tokens, "check", check)
    return seen


# --- tokens ----------------------------------------------------------------------------------------------


def test_a_token_is_checked_once_within_the_cache_time(instance, llama, users, bearer, checks, settings):
    settings.GATEWAY_TOKEN_CACHE_SECONDS = 5
    auth = bearer(users["viewer"])
    assert chat(auth)[0] == 200
    assert chat(auth)[0] == 200
    assert len(checks) == 1
    assert UsageRecord.objects.filter(status=200).count() == 2
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0


def test_a_revoked_token_stops_working_within_the_cache_time(instance, llama, users, bearer, clock, settings):
    settings.GATEWAY_TOKEN_CACHE_SECONDS = 5
    auth = bearer(users["viewer"])
    assert chat(auth)[0] == 200
    ApiToken.objects.update(revoked_at=timezone.now())
    assert chat(auth)[0] == 200  # the documented lag: believed for up to 5 s
    clock(5.1)
    status, answer = chat(auth)
    assert status == 401 and "revoked" in answer["error"]["message"]


def test_with_a_cache_time_of_0_revocation_is_immediate(instance, llama, users, bearer, checks, settings):
    settings.GATEWAY_TOKEN_CACHE_SECONDS = 0
    auth = bearer(users["viewer"])
    assert chat(auth)[0] == 200
    ApiToken.objects.update(revoked_at=timezone.now())
    status, answer = chat(auth)
    assert status == 401 and "revoked" in answer["error"]["message"]
    assert len(checks) == 2


def wait_for(condition, seconds=5.0):
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline
        time.sleep(0.01)


def test_a_token_in_use_is_checked_again_in_the_background(
    instance, llama, users, bearer, checks, clock, settings
):
    settings.GATEWAY_TOKEN_CACHE_SECONDS = 5
    auth = bearer(users["viewer"])
    assert chat(auth)[0] == 200  # checked on the way
    clock(3)  # past half its time: the next use has it checked again, off the request's way
    assert chat(auth)[0] == 200
    wait_for(lambda: len(checks) == 2)
    ApiToken.objects.update(revoked_at=timezone.now())
    clock(3)  # 6 s after the first check, 3 after the second: still believed (within 5 s of a check)
    assert chat(auth)[0] == 200
    wait_for(lambda: not access._tokens.entries)  # that use's check found the revocation
    status, answer = chat(auth)
    assert status == 401 and "revoked" in answer["error"]["message"]


def test_instances_in_use_are_read_again_in_the_background(instance, llama, users, bearer, clock, settings):
    settings.GATEWAY_INSTANCE_CACHE_SECONDS = 10
    auth = bearer(users["viewer"])
    assert chat(auth)[0] == 200
    [before] = access.cached_instances("tiny")
    clock(6)
    assert chat(auth)[0] == 200
    wait_for(lambda: access.cached_instances("tiny")[0] is not before)
    assert access.cached_instances("tiny")[0].pk == instance.pk


def test_a_deactivated_user_or_a_lost_role_is_refused_after_the_cache_time(
    instance, llama, users, bearer, clock, settings
):
    settings.GATEWAY_TOKEN_CACHE_SECONDS = 5
    viewer, operator = bearer(users["viewer"]), bearer(users["operator"])
    assert chat(viewer)[0] == 200 and chat(operator)[0] == 200
    users["viewer"].groups.clear()
    type(users["operator"]).objects.filter(pk=users["operator"].pk).update(is_active=False)
    clock(5.1)
    assert chat(viewer)[0] == 403
    status, answer = chat(operator)
    assert status == 401 and "inactive" in answer["error"]["message"]


def test_an_expiry_is_exact_even_for_a_cached_token(instance, llama, users, monkeypatch, settings):
    settings.GATEWAY_TOKEN_CACHE_SECONDS = 60
    soon = timezone.now() + timedelta(minutes=5)
    auth = f"Bearer {ApiToken.issue(users['viewer'], 'short', expires_at=soon)[1]}"
    assert chat(auth)[0] == 200
    later = soon + timedelta(seconds=1)
    monkeypatch.setattr(timezone, "now", lambda: later)
    status, answer = chat(auth)
    assert status == 401 and "expired" in answer["error"]["message"]


# --- instances -------------------------------------------------------------------------------------------


def test_a_restarted_instance_is_not_asked_with_its_old_address(instance, llama, users, bearer):
    """A restart keeps the row but changes port and key: the cached copy no longer matches the count's
    UPDATE, so the request goes to the new address, and nothing to the old one."""
    auth = bearer(users["viewer"])
    assert chat(auth)[0] == 200
    GpuInstance.objects.filter(pk=instance.pk).update(port=18998, api_key="new-secret", pid=4343)
    llama.seen.clear()
    status, answer = chat(auth)
    assert status == 200 and answer["choices"][0]["message"]["content"] == "Hello"
    [answered] = [r for r in llama.seen if r.url.path == "/v1/chat/completions"]
    assert answered.url.port == 18998 and answered.headers["Authorization"] == "Bearer new-secret"
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0
    assert list(UsageRecord.objects.values_list("instance_id", "status")) == [(instance.pk, 200)] * 2


def test_a_stopped_instance_in_the_cache_is_not_used(instance, llama, users, bearer):
    auth = bearer(users["viewer"])
    assert chat(auth)[0] == 200
    GpuInstance.objects.filter(pk=instance.pk).update(status=GpuInstance.Status.STOPPED)
    status, answer = chat(auth)  # nothing runs: a viewer may not load it
    assert status == 403 and "operator" in answer["error"]["message"]
    row = GpuInstance.objects.get(pk=instance.pk)
    assert row.in_flight == 0
    assert access.cached_instances("tiny") is None


def test_an_instance_that_cannot_be_reached_leaves_the_cache(instance, llama, users, bearer, monkeypatch):
    auth = bearer(users["viewer"])
    assert chat(auth)[0] == 200
    assert access.cached_instances("tiny") is not None

    async def refuse(request):
        raise httpx.ConnectError("connection refused")

    monkeypatch.setattr(llama, "handler", refuse)
    status, answer = chat(auth)
    assert status == 502 and answer["error"]["code"] == "upstream_error"
    assert access.cached_instances("tiny") is None
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0


def test_with_a_cache_time_of_0_nothing_is_cached(instance, llama, users, bearer, settings):
    settings.GATEWAY_TOKEN_CACHE_SECONDS = 0
    settings.GATEWAY_INSTANCE_CACHE_SECONDS = 0
    auth = bearer(users["viewer"])
    assert chat(auth)[0] == 200 and chat(auth)[0] == 200
    assert access.cached_instances("tiny") is None and not access._tokens.entries


# --- the gateway's middleware chain (through the ASGI entry the server runs) -----------------------------


def asgi(
    method: str, path: str, body: bytes = b"", headers=(), *, sent: list | None = None, upstream=None
) -> tuple[int, dict, bytes]:
    """One request through the ASGI entry; `sent` collects the ASGI messages, `upstream` (an async context
    manager: a stand-in llama-server on a socket) runs around it."""
    from llamacontroller_site.asgi import application

    sent = [] if sent is None else sent

    async def scenario():
        if upstream is not None:
            async with upstream:
                return await ask()
        return await ask()

    async def ask():
        messages = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if messages:
                return messages.pop(0)
            await __import__("asyncio").sleep(3600)

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http", "method": method, "path": path, "raw_path": path.encode(), "query_string": b"",
            "headers": [(b"host", b"127.0.0.1"), (b"content-length", str(len(body)).encode()), *headers],
            "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "scheme": "http", "root_path": "",
        }  # fmt: skip
        await application(scope, receive, send)

    run(scenario)
    start = next(m for m in sent if m["type"] == "http.response.start")
    content = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], {k.decode().lower(): v.decode() for k, v in start["headers"]}, content


def test_the_gateway_routes_keep_the_security_headers_and_the_session(instance, llama, users, bearer):
    from django.conf import settings
    from django.test import Client

    from gateway.handler import PATHS

    assert "/v1/chat/completions" in PATHS and "/api/tags" in PATHS and "/api/v1/models/" not in PATHS
    status, headers, _ = asgi(
        "GET", "/api/tags", headers=[(b"authorization", bearer(users["viewer"]).encode())]
    )
    assert status == 200
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert headers["content-length"]

    browser = Client()
    browser.force_login(users["viewer"])
    cookie = f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}"
    status, headers, content = asgi("GET", "/api/tags", headers=[(b"cookie", cookie.encode())])
    assert status == 200 and json.loads(content)["models"][0]["name"] == "tiny:latest"
    assert "Cookie" in headers.get("vary", "")
    body = json.dumps(CHAT).encode()
    status, _, content = asgi(
        "POST", "/api/chat", body, [(b"cookie", cookie.encode()), (b"content-type", b"application/json")]
    )
    assert status == 403 and "CSRF" in json.loads(content)["error"]
    assert asgi("GET", "/api/tags")[0] == 401


def test_a_token_request_skips_the_session_but_keeps_the_headers(instance, llama, users, bearer):
    """A request with an API token takes the chain without the session and authentication middleware: the
    token decides (a session cookie beside it is neither read nor answered with Vary: Cookie), and the
    header work is the same as for everyone."""
    from django.conf import settings
    from django.test import Client

    browser = Client()
    browser.force_login(users["admin"])
    cookie = f"{settings.SESSION_COOKIE_NAME}={browser.cookies[settings.SESSION_COOKIE_NAME].value}"
    body = json.dumps({**CHAT, "stream": False}).encode()
    token = bearer(users["viewer"])
    status, headers, content = asgi(
        "POST", "/api/chat", body, [(b"authorization", token.encode()), (b"cookie", cookie.encode())]
    )
    assert status == 200 and json.loads(content)["done"] is True
    assert "Cookie" not in headers.get("vary", "")
    assert headers["x-frame-options"] == "DENY" and headers["x-content-type-options"] == "nosniff"
    assert UsageRecord.objects.get().user == users["viewer"]  # the token's user, not the session's admin

    status, headers, content = asgi(
        "GET", "/api/tags", headers=[(b"authorization", b"Bearer lc_not-a-token")]
    )
    assert status == 401 and headers["www-authenticate"] == "Bearer"
    assert asgi("GET", "/api/tags", headers=[(b"authorization", b"Basic eDp5")])[0] == 401


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


def test_a_stream_s_tail_goes_out_with_its_end(instance, users, bearer):
    """Against a real socket: once the instance's whole answer is in, what is left of the stream goes out with
    its end (one write to the client instead of two: the end waits for the usage record either way); the
    first chunk never waits."""
    import socket

    from tests.gateway.test_http11 import Server

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    GpuInstance.objects.filter(pk=instance.pk).update(port=port)
    first = b'data: {"choices":[{"index":0,"delta":{"content":"Hi"}}]}\n\n'
    last = b'data: {"choices":[],"timings":{"prompt_n":3,"predicted_n":1}}\n\n'
    props = b'{"total_slots": 4}'
    server = Server(
        [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(props), props)],
        [
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
            + _chunk(first),
            _chunk(last) + _chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n",
        ],
        pause=0.05,
        port=port,
    )
    sent = []
    body = json.dumps({**CHAT, "stream": True}).encode()
    auth = [(b"authorization", bearer(users["viewer"]).encode())]
    status, _, content = asgi("POST", "/v1/chat/completions", body, auth, sent=sent, upstream=server)
    assert status == 200
    bodies = [
        (m.get("body", b""), m.get("more_body", False)) for m in sent if m["type"] == "http.response.body"
    ]
    assert bodies == [(first, True), (last + b"data: [DONE]\n\n", False)]
    record = UsageRecord.objects.get()
    assert (record.status, record.prompt_tokens, record.completion_tokens) == (200, 3, 1)
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0


def test_an_instance_from_the_slow_path_has_what_the_event_loop_reads(
    instance, llama, users, bearer, monkeypatch
):
    """A load waited for returns a refreshed row (no related objects): the gateway reads its host and model
    on the database thread, since the event loop may not query."""
    from models_app import ondemand

    GpuInstance.objects.filter(pk=instance.pk).update(status=GpuInstance.Status.STARTING)

    def loaded(model, actor, keep_alive_seconds=None):
        GpuInstance.objects.filter(pk=instance.pk).update(status=GpuInstance.Status.RUNNING)
        return GpuInstance.objects.get(pk=instance.pk)

    monkeypatch.setattr(ondemand, "ensure_running", loaded)
    assert chat(bearer(users["viewer"]))[0] == 200
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0


def test_the_web_worker_keeps_what_it_loaded_out_of_the_garbage_collector():
    import gc

    import llamacontroller_site.asgi  # noqa: F401

    assert gc.get_freeze_count() > 10_000
