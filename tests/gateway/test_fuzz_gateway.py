"""The gateway's routes never answer 5xx, whatever the body (issue 17 item 6): first the model names the
database cannot take (a NUL character was a 500 on PostgreSQL, a lone surrogate on both databases), then
hypothesis, seeded and bounded, over every route for an anonymous caller, a viewer and an operator. A stand-in
llama-server answers where a model runs (tests/gateway/fakes.py); unknown models answer 404."""

import json

import pytest

from gateway.models import UsageRecord
from tests.gateway.fakes import request

pytestmark = pytest.mark.django_db(transaction=True)

OLLAMA_BODY_ROUTES = ["/api/chat", "/api/generate", "/api/embed", "/api/embeddings", "/api/show"]
OPENAI_BODY_ROUTES = ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
UNSTORABLE = {
    "x\u0000": "model must not contain NUL characters",
    "x\ud800": "model must be valid Unicode (it contains a lone surrogate)",
}


def body_for(model) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "prompt": "hi", "input": "hi"}


@pytest.mark.parametrize("path", OLLAMA_BODY_ROUTES + OPENAI_BODY_ROUTES)
@pytest.mark.parametrize("name", list(UNSTORABLE), ids=["nul", "surrogate"])
def test_a_model_name_the_database_cannot_take_is_400(path, name, instance, llama, users, bearer):
    raw = json.dumps(body_for(name)).encode()  # json escapes both: \u0000, \ud800
    status, _, content = request("POST", path, raw=raw, auth=bearer(users["viewer"]))
    assert status == 400
    error = json.loads(content)["error"]
    if path.startswith("/v1/"):
        assert error == {
            "message": UNSTORABLE[name],
            "type": "invalid_request_error",
            "code": "invalid_model",
        }
    else:
        assert error == UNSTORABLE[name]
    assert not llama.seen
    if path != "/api/show":  # the refusal is recorded, without the name
        assert list(UsageRecord.objects.values_list("model_id", "status")) == [("", 400)]


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_anonymous_callers_still_learn_they_need_a_token_first(path, instance, llama):
    status, _, _ = request("POST", path, raw=json.dumps(body_for("x\u0000")).encode())
    assert status == 401
