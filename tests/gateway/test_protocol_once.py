"""The inference routes' protocol is written once (gateway/protocol.py, issue 18 item 5): every route,
Ollama's and OpenAI's, answers the same way to the wrong method, a refused body, a stranger, an answer, a
keep_alive it ignores and a client that leaves; and no view repeats the protocol's steps itself."""

import ast
import asyncio
import gc
import json
from pathlib import Path

import pytest
from django.contrib.auth.models import AnonymousUser
from django.test import AsyncRequestFactory

from gateway import views_ollama, views_openai
from gateway.models import UsageRecord
from models_app.models import GpuInstance
from tests.gateway.fakes import request, run

pytestmark = pytest.mark.django_db(transaction=True)

MESSAGES = [{"role": "user", "content": "hi"}]
# Every inference route with a body it answers without streaming.
ROUTES = {
    "/api/generate": {"model": "tiny", "prompt": "hi", "stream": False},
    "/api/chat": {"model": "tiny", "messages": MESSAGES, "stream": False},
    "/api/embed": {"model": "tiny", "input": "hi"},
    "/api/embeddings": {"model": "tiny", "prompt": "hi"},
    "/v1/chat/completions": {"model": "tiny", "messages": MESSAGES},
    "/v1/completions": {"model": "tiny", "prompt": "hi"},
    "/v1/embeddings": {"model": "tiny", "input": "hi"},
}
GATEWAY = Path(__file__).resolve().parents[2] / "gateway"


def message(path: str, content: bytes) -> str:
    """The error's text in the route's dialect (and the shape checked on the way)."""
    error = json.loads(content)["error"]
    if path.startswith("/v1/"):
        assert set(error) == {"message", "type", "code"}
        return error["message"]
    assert isinstance(error, str)
    return error


def in_flight(instance) -> int:
    return GpuInstance.objects.get(pk=instance.pk).in_flight


@pytest.mark.parametrize("path", ROUTES)
def test_every_route_answers_and_records_alike(path, instance, llama, users, bearer):
    auth = bearer(users["viewer"])
    status, response, _ = request("GET", path, auth=auth)
    assert status == 405 and response["Allow"] == "POST"

    # A body refused before the model is known: a stranger is told to authenticate, and leaves no record.
    status, response, content = request("POST", path, raw=b"{nope")
    assert status == 401 and response["WWW-Authenticate"] == "Bearer" and "Bearer" in message(path, content)
    assert not UsageRecord.objects.exists()

    # The same body from a caller: a 400 in the route's dialect, recorded under their name.
    status, _, content = request("POST", path, raw=b"{nope", auth=auth)
    assert status == 400 and "not valid JSON" in message(path, content)
    status, _, content = request("POST", path, {**ROUTES[path], "model": ""}, auth=auth)
    assert status == 400 and message(path, content) == "model is required"

    status, response, content = request("POST", path, ROUTES[path], auth=auth)
    assert status == 200, content
    assert "X-LlamaController-Keep-Alive" not in response
    records = list(UsageRecord.objects.order_by("id").values_list("endpoint", "status", "user__username"))
    assert records == [(path, 400, "viewer"), (path, 400, "viewer"), (path, 200, "viewer")]
    assert in_flight(instance) == 0 and not llama.seen[-1].url.path.startswith("/api/")


@pytest.mark.parametrize("path", ROUTES)
def test_every_route_says_when_it_ignored_a_keep_alive(path, instance, llama, users, bearer):
    GpuInstance.objects.filter(pk=instance.pk).update(owner=users["operator"], loaded_on_demand=True)
    body = {**ROUTES[path], "keep_alive": 0}
    status, response, content = request("POST", path, body, auth=bearer(users["viewer"]))
    assert status == 200, content
    assert response["X-LlamaController-Keep-Alive"] == "ignored (you may not unload this model)"
    assert GpuInstance.objects.get(pk=instance.pk).keep_alive_seconds is None


@pytest.mark.parametrize(
    "path, view", [("/api/chat", views_ollama.chat), ("/v1/chat/completions", views_openai.chat_completions)]
)
def test_a_stream_dropped_unread_is_finished_on_both_dialects(path, view, instance, llama, users, bearer):
    auth = bearer(users["viewer"])

    async def scenario():
        body = {"model": "tiny", "messages": MESSAGES, "stream": True}
        factory = AsyncRequestFactory()
        call = factory.post(path, data=json.dumps(body), content_type="application/json")
        call.META["HTTP_AUTHORIZATION"] = auth
        call.user = AnonymousUser()
        response = await view(call)
        assert response.streaming and response["Cache-Control"] == "no-cache"
        del response
        gc.collect()
        await asyncio.sleep(0.3)

    run(scenario)
    record = UsageRecord.objects.get()
    assert record.endpoint == path and record.status == 200 and record.client_disconnected
    assert in_flight(instance) == 0


@pytest.mark.parametrize("path", ["/api/tags", "/api/ps", "/v1/models"])
def test_every_listing_answers_alike(path, instance, llama, users, bearer):
    auth = bearer(users["viewer"])
    status, response, _ = request("POST", path, {}, auth=auth)
    assert status == 405 and response["Allow"] == "GET"
    status, response, content = request("GET", path, auth="Bearer lc_nonsense")
    assert status == 401 and response["WWW-Authenticate"] == "Bearer" and message(path, content)
    status, _, content = request("GET", path, auth=auth)
    rows = json.loads(content)["data" if path.startswith("/v1/") else "models"]
    assert status == 200 and len(rows) == 1
    assert not UsageRecord.objects.exists()  # listings are not usage


# Steps of the protocol that only gateway/protocol.py takes (gateway/exchange.py defines them).
PROTOCOL_STEPS = {"finish", "client_left", "guard", "authenticate_only", "noted", "StreamingHttpResponse"}


def test_no_view_takes_the_protocols_steps_itself():
    """A fourth copy of the protocol (or the three old ones back) would have to finish exchanges, note a
    client that left, guard or build a stream, or authenticate a refused body itself."""
    found = []
    for module in sorted(GATEWAY.glob("*.py")):
        if module.name in ("protocol.py", "exchange.py"):
            continue
        for node in ast.walk(ast.parse(module.read_text())):
            name = getattr(node, "attr", None) or getattr(node, "id", None)
            if isinstance(node, ast.alias):
                name = node.name
            if name in PROTOCOL_STEPS:
                found.append(f"{module.name}:{node.lineno} {name}")
    assert found == []
