"""The gateway's routes never answer 5xx, whatever the body (issue 17 item 6): first the model names the
database cannot take (a NUL character was a 500 on PostgreSQL, a lone surrogate on both databases), then
hypothesis, seeded and bounded, over every route for an anonymous caller, a viewer and an operator. A stand-in
llama-server answers where a model runs (tests/gateway/fakes.py); unknown models answer 404."""

import json
import logging
import os

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import access
from gateway.models import UsageRecord
from models_app.models import GpuInstance, ModelConfig
from tests.gateway.fakes import request
from tests.helpers import running_instance

pytestmark = pytest.mark.django_db(transaction=True)

OLLAMA_BODY_ROUTES = ["/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show"]
OPENAI_BODY_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
UNSTORABLE = {
    "x\u0000": "model must not contain NUL characters",
    "x\ud800": "model must be valid Unicode (it contains a lone surrogate)",
}


def body_for(model) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}


@pytest.mark.parametrize("name", list(UNSTORABLE), ids=["nul", "surrogate"])
def test_a_model_name_the_database_cannot_take_is_400(name, instance, llama, users, bearer):
    auth = bearer(users["viewer"])
    for path in OLLAMA_BODY_ROUTES + OPENAI_BODY_ROUTES:
        raw = json.dumps(body_for(name)).encode()  # json escapes both: \u0000, \ud800
        status, _, content = request("POST", path, raw=raw, auth=auth)
        assert status == 400, path
        error = json.loads(content)["error"]
        if path.startswith("/v1/"):
            expected = {"message": UNSTORABLE[name], "type": "invalid_request_error", "code": "invalid_model"}
        else:
            expected = UNSTORABLE[name]
        assert error == expected, path
    assert not llama.seen
    # Each refusal is recorded (but /api/show's: it records nothing), without the name.
    records = list(UsageRecord.objects.values_list("model_id", "status"))
    assert records == [("", 400)] * (len(OLLAMA_BODY_ROUTES + OPENAI_BODY_ROUTES) - 1)


def test_tool_calls_of_the_wrong_shape_are_400(instance, llama, users, bearer):
    """Found by the fuzz test below: both were a 500 (TypeError, AttributeError)."""
    for message, error in [
        ({"role": "assistant", "content": "", "tool_calls": 1}, "a message's tool_calls must be a list"),
        (
            {"role": "assistant", "content": "", "tool_calls": [{"function": "f"}]},
            "a tool call's function must be an object with name and arguments",
        ),
    ]:
        chat = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}, message]}
        status, _, content = request("POST", "/api/chat", chat, auth=bearer(users["viewer"]))
        assert (status, json.loads(content)) == (400, {"error": error})
    assert not llama.seen


def test_anonymous_callers_still_learn_they_need_a_token_first(instance, llama):
    for path in ("/api/chat", "/v1/chat/completions"):
        status, _, _ = request("POST", path, raw=json.dumps(body_for("x\u0000")).encode())
        assert status == 401, path


# --- hypothesis over every route ---------------------------------------------------------------------------

# Any character, NUL and lone surrogates included (hypothesis leaves surrogates out unless asked).
ANY_TEXT = st.text(st.characters(exclude_categories=()), max_size=12)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    ANY_TEXT,
    st.sampled_from([10**400, -(10**400), 1e308]),
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(ANY_TEXT, inner, max_size=3),
    max_leaves=6,
)
# Models that run (tiny: the operator's instance; open: anonymous use allowed), most often, so that most
# examples reach the stand-in llama-server; then unknown names, and anything at all.
RUNNING = st.sampled_from(["tiny", "tiny:latest", "open", "open:latest"])
MODEL_NAMES = st.one_of(
    RUNNING,
    RUNNING,
    RUNNING,
    st.sampled_from(["nope", "", " ", "tiny\x00", "../tiny", "TINY", "tiny:7b"]),
    ANY_TEXT,
    JSON_VALUES,
)
KEEP_ALIVE = st.one_of(
    st.sampled_from(["5m", "0", "0s", "1s", "-1", "1h30m", "10", "inf", "nan", "1e999", "-5m", "1.5h"]),
    st.integers(-10, 10**6),
    SCALARS,
)
MESSAGE = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["user", "system", "assistant", "tool"]) | ANY_TEXT,
        "content": ANY_TEXT | JSON_VALUES,
    },
    optional={"images": JSON_VALUES, "tool_calls": JSON_VALUES},
)
OPTIONS = st.dictionaries(
    st.sampled_from(["num_ctx", "num_predict", "temperature", "top_k", "top_p", "seed", "stop"]) | ANY_TEXT,
    JSON_VALUES,
    max_size=3,
)
BODY = st.fixed_dictionaries(
    {"model": MODEL_NAMES},
    optional={
        "name": MODEL_NAMES,
        "messages": st.lists(MESSAGE, max_size=2) | JSON_VALUES,
        "prompt": ANY_TEXT | JSON_VALUES,
        "input": ANY_TEXT | st.lists(ANY_TEXT, max_size=3) | JSON_VALUES,
        "stream": st.booleans() | JSON_VALUES,
        "keep_alive": KEEP_ALIVE,
        "options": OPTIONS | JSON_VALUES,
        "format": JSON_VALUES,
        "dimensions": st.integers(-3, 5) | JSON_VALUES,
        "max_tokens": st.integers(-3, 5) | JSON_VALUES,
        "system": ANY_TEXT | JSON_VALUES,
        "suffix": ANY_TEXT | JSON_VALUES,
        "raw": JSON_VALUES,
        "think": JSON_VALUES,
        "tools": JSON_VALUES,
    },
)
# What a client means to send (a running model, a prompt, messages with text), with fuzzed extras.
PLAUSIBLE = st.builds(
    lambda body, model, text, stream: {
        **body,
        "model": model,
        "messages": [{"role": "user", "content": text}],
        "prompt": text,
        "input": text,
        "stream": stream,
    },
    BODY,
    RUNNING,
    st.text(min_size=1, max_size=12),
    st.booleans(),
)
# Mostly JSON objects, sometimes anything else a client could send.
PAYLOAD = st.one_of(
    PLAUSIBLE.map(lambda body: json.dumps(body).encode()),
    PLAUSIBLE.map(lambda body: json.dumps(body).encode()),
    BODY.map(lambda body: json.dumps(body).encode()),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.binary(max_size=40),
)
POST_ROUTES = OLLAMA_BODY_ROUTES + OPENAI_BODY_ROUTES + ["/api/pull", "/api/delete"]
GET_ROUTES = ["/api/tags", "/api/ps", "/api/version", "/v1/models"]
AUTHORIZATION = st.sampled_from([None, None, "Bearer lc_nonsense", "Basic YTpi", "Bearer", "Bearer a b"])
# Per caller: the whole file runs in about a minute on two cores. LLAMACONTROLLER_FUZZ_EXAMPLES=1000 looks
# deeper.
EXAMPLES = int(os.environ.get("LLAMACONTROLLER_FUZZ_EXAMPLES", "60"))


@pytest.fixture
def world(instance, llama, users, bearer, fake_gpus, tiny_model, monkeypatch):
    """tiny runs for the operator on GPU 0, `open` (anonymous use allowed) on GPU 1. The stand-in
    llama-server answers a body it cannot read with 400, as llama-server does (the OpenAI routes pass the
    client's body through unread: its own KeyError would be a 500 of the test's making), and every answer
    arrives as a stream, as over a network (httpx marks a response made from bytes as already read, which
    the passthrough of `"stream": true` to /v1/embeddings would then find consumed)."""
    answer = llama.handler

    async def tolerant(upstream_request: httpx.Request) -> httpx.Response:
        try:
            response = await answer(upstream_request)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            error = {"code": 400, "message": f"invalid request: {exc!r}", "type": "invalid_request_error"}
            response = httpx.Response(400, json={"error": error})
        if not response.is_stream_consumed:
            return response
        content = response.content

        async def over_the_network():
            yield content

        return httpx.Response(response.status_code, headers=response.headers, content=over_the_network())

    monkeypatch.setattr(llama, "handler", tolerant)
    GpuInstance.objects.filter(pk=instance.pk).update(owner=users["operator"])
    opened = ModelConfig.objects.create(
        id="open", name="Open", path=tiny_model.path, allow_anonymous=True, cli_params={"c": 256}
    )
    other = running_instance(fake_gpus.host, opened, fake_gpus.gpus[1:2])
    GpuInstance.objects.filter(pk=other.pk).update(port=18998, api_key="other-secret", pid=4243)
    tokens = {name: bearer(users[name]) for name in ("viewer", "operator")}
    return {"instances": [instance.pk, other.pk], "tokens": tokens}


def _restore(world) -> None:
    """Each example starts from the same rows: a keep_alive 0 of an earlier one may have unloaded a model."""
    GpuInstance.objects.filter(pk__in=world["instances"]).update(
        status=GpuInstance.Status.RUNNING, in_flight=0, keep_alive_seconds=None, stopped_at=None
    )
    access.clear_caches()


def _check_shape(path: str, status: int, content: bytes) -> None:
    """An error from a gateway route is JSON in its dialect's shape (a 404 for an unknown path: the site's)."""
    if status < 400 or path in ("/api/pull", "/api/delete") or status == 405:
        return
    error = json.loads(content)["error"]
    if path.startswith("/v1/"):
        assert set(error) == {"message", "type", "code"}, error
    else:
        assert isinstance(error, str), error


@pytest.mark.parametrize("caller", ["anonymous", "viewer", "operator"])
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(
    route=st.one_of(st.sampled_from(POST_ROUTES), st.sampled_from(POST_ROUTES), st.sampled_from(GET_ROUTES)),
    payload=PAYLOAD,
    authorization=AUTHORIZATION,
)
def test_no_route_answers_5xx(caller, route, payload, authorization, world, caplog):
    _restore(world)
    caplog.clear()
    auth = world["tokens"].get(caller) or authorization
    method = "GET" if route in GET_ROUTES else "POST"
    status, _, content = request(method, route, raw=payload, auth=auth)
    assert status < 500, (status, content[:300])
    _check_shape(route, status, content)
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, [r.getMessage() for r in problems]
