"""The gateway's routes: who may call them, the refusals' shapes, translation through the views, slots and
the usage record (a stand-in llama-server; tests/e2e/test_gateway.py runs the real one)."""

import asyncio
import json

import pytest
from django.test import AsyncClient

from gateway.models import UsageRecord
from models_app.models import GpuInstance, ModelConfig
from tests.gateway.fakes import read, request, run, sse

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


def lines(body: bytes) -> list[dict]:
    assert b"\n\n" not in body and not body.startswith(b"\n"), "never an empty line"
    return [json.loads(line) for line in body.splitlines()]


# --- who may ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body",
    [
        ("/api/chat", CHAT),
        ("/api/generate", {"model": "tiny", "prompt": "hi"}),
        ("/api/embed", {"model": "tiny", "input": "hi"}),
        ("/api/show", {"model": "tiny"}),
        ("/v1/chat/completions", CHAT),
        ("/v1/embeddings", {"model": "tiny", "input": "hi"}),
    ],
)
def test_anonymous_is_401_in_the_dialect_of_the_route(path, body, instance, llama):
    status, response, content = request("POST", path, body)
    assert status == 401
    error = json.loads(content)["error"]
    if path.startswith("/v1/"):
        assert error["type"] == "authentication_error" and "Bearer" in error["message"]
    else:
        assert isinstance(error, str) and "Bearer" in error
    assert response["WWW-Authenticate"] == "Bearer"
    assert not llama.seen and not UsageRecord.objects.exists()


@pytest.mark.parametrize("path", ["/api/tags", "/api/ps", "/v1/models"])
def test_listings_need_a_token(path, instance, llama):
    assert request("GET", path)[0] == 401


def test_a_bad_or_revoked_token_is_401(instance, llama, users, bearer):
    from django.utils import timezone

    from accounts.models import ApiToken

    assert request("POST", "/api/chat", CHAT, auth="Bearer lc_nonsense")[0] == 401
    header = bearer(users["viewer"])
    ApiToken.objects.update(revoked_at=timezone.now())
    status, _, content = request("POST", "/v1/chat/completions", CHAT, auth=header)
    assert status == 401 and "revoked" in json.loads(content)["error"]["message"]


def test_a_user_without_a_role_is_403(instance, llama, users, bearer):
    status, _, content = request("POST", "/api/chat", CHAT, auth=bearer(users["outsider"]))
    assert status == 403 and "viewer role" in json.loads(content)["error"]


def test_anonymous_use_where_an_admin_allowed_it(instance, llama, tiny_model):
    ModelConfig.objects.filter(pk="tiny").update(allow_anonymous=True)
    status, _, content = request("POST", "/api/chat", {**CHAT, "stream": False})
    assert status == 200, content
    assert json.loads(content)["message"]["content"] == "Hello"
    assert [m["name"] for m in json.loads(request("GET", "/api/tags")[2])["models"]] == ["tiny:latest"]
    record = UsageRecord.objects.get()
    assert record.user is None and record.status == 200


def test_session_login_works_and_writes_need_csrf(instance, llama, users):
    async def scenario():
        client = AsyncClient(enforce_csrf_checks=True)
        await client.aforce_login(users["viewer"])
        tags = await client.get("/api/tags")
        chat = await client.post("/api/chat", data=json.dumps(CHAT), content_type="application/json")
        return tags.status_code, chat.status_code, await read(chat)

    tags, chat, content = run(scenario)
    assert tags == 200
    assert chat == 403 and "CSRF" in json.loads(content)["error"]


# --- bad input -------------------------------------------------------------------------------------------


def test_unknown_model_is_404_in_both_dialects(instance, llama, users, bearer):
    auth = bearer(users["viewer"])
    status, _, content = request("POST", "/api/chat", {**CHAT, "model": "nope"}, auth=auth)
    assert status == 404 and json.loads(content) == {"error": "model 'nope' not found"}
    status, _, content = request("POST", "/v1/chat/completions", {**CHAT, "model": "nope:latest"}, auth=auth)
    error = json.loads(content)["error"]
    assert status == 404 and error["message"] == "model 'nope:latest' not found"
    assert error["type"] == "not_found_error" and error["code"] == "model_not_found"
    assert UsageRecord.objects.filter(status=404).count() == 2


@pytest.mark.parametrize("path", ["/api/chat", "/api/generate", "/api/embed", "/v1/chat/completions"])
def test_malformed_json_and_missing_model_are_400(path, instance, llama, users, bearer):
    auth = bearer(users["viewer"])
    status, _, content = request("POST", path, raw=b"{not json", auth=auth)
    assert status == 400 and "not valid JSON" in content.decode()
    status, _, content = request("POST", path, {"messages": [], "prompt": "x", "input": "x"}, auth=auth)
    assert status == 400 and "model is required" in content.decode()
    status, _, content = request("POST", path, ["a", "list"], auth=auth)
    assert status == 400 and "JSON object" in content.decode()
    assert not [r for r in llama.seen if r.url.path != "/props"]


def test_a_body_over_the_limit_is_413(instance, llama, users, bearer, settings):
    settings.GATEWAY_MAX_BODY_BYTES = 2048
    big = {**CHAT, "messages": [{"role": "user", "content": "x" * 5000}]}
    status, _, content = request("POST", "/api/chat", big, auth=bearer(users["viewer"]))
    assert status == 413 and "larger than 2048 bytes" in json.loads(content)["error"]
    status, _, content = request("POST", "/v1/chat/completions", big, auth=bearer(users["viewer"]))
    assert status == 413 and json.loads(content)["error"]["code"] == "body_too_large"


def test_the_asgi_entry_refuses_a_large_body_while_it_arrives(settings):
    """Django reads the whole body before a view runs: asgi.py stops it at the limit, even chunked."""
    from llamacontroller_site.asgi import application

    settings.GATEWAY_MAX_BODY_BYTES = 1024
    sent = []

    async def scenario(headers):
        messages = [{"type": "http.request", "body": b"x" * 800, "more_body": True}] * 3

        async def receive():
            return messages.pop(0) if messages else {"type": "http.disconnect"}

        async def send(message):
            sent.append(message)

        scope = {
            "type": "http", "method": "POST", "path": "/api/chat", "headers": headers, "query_string": b"",
            "server": ("127.0.0.1", 8000), "client": ("127.0.0.1", 5000), "scheme": "http", "root_path": "",
        }  # fmt: skip
        await application(scope, receive, send)

    async def declared():
        await scenario([(b"content-length", b"2400")])

    async def chunked():
        await scenario([])  # no length given

    run(declared)
    assert sent[0]["status"] == 413 and b"larger than 1024" in sent[1]["body"]
    sent.clear()
    run(chunked)
    assert [m["status"] for m in sent if m["type"] == "http.response.start"] == [413]


def test_a_bad_keep_alive_is_400(instance, llama, users, bearer):
    status, _, content = request(
        "POST",
        "/api/generate",
        {"model": "tiny", "prompt": "x", "keep_alive": "soon"},
        auth=bearer(users["viewer"]),
    )
    assert status == 400 and "keep_alive" in json.loads(content)["error"]


# --- translation through the views -----------------------------------------------------------------------


def test_ollama_chat_streams_ndjson_with_the_final_figures(instance, llama, users, bearer):
    status, response, content = request("POST", "/api/chat", CHAT, auth=bearer(users["viewer"]))
    assert status == 200 and response["Content-Type"] == "application/x-ndjson"
    chunks = lines(content)
    assert [c["message"]["content"] for c in chunks[:-1]] == ["Hel", "lo"]
    assert all(c["done"] is False and c["model"] == "tiny" for c in chunks[:-1])
    final = chunks[-1]
    assert final["done"] is True and final["done_reason"] == "stop"
    assert final["prompt_eval_count"] == 12 and final["prompt_eval_duration"] == 5_500_000
    assert final["eval_count"] == 2 and final["eval_duration"] == 12_250_000
    assert final["total_duration"] >= final["load_duration"] >= 0
    # What went upstream: the instance's own key, OpenAI's chat route, streamed.
    sent = [r for r in llama.seen if r.url.path == "/v1/chat/completions"][0]
    assert sent.headers["Authorization"] == "Bearer instance-secret"
    assert json.loads(sent.content)["messages"] == [{"role": "user", "content": "hi"}]
    record = UsageRecord.objects.get()
    assert (record.endpoint, record.status, record.prompt_tokens, record.completion_tokens) == (
        "/api/chat", 200, 12, 2,
    )  # fmt: skip
    assert record.user.username == "viewer" and record.token is not None and record.instance_id == instance.pk
    assert record.time_to_first_token_ms is not None and record.duration_ms >= record.time_to_first_token_ms
    assert not record.client_disconnected
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0


def test_ollama_generate_not_streamed(instance, llama, users, bearer):
    body = {
        "model": "tiny:latest",
        "prompt": "hi",
        "system": "be brief",
        "stream": False,
        "options": {"num_predict": 5},
    }
    status, _, content = request("POST", "/api/generate", body, auth=bearer(users["viewer"]))
    answer = json.loads(content)
    assert status == 200 and answer["response"] == "Hello" and answer["done"] is True
    assert answer["model"] == "tiny:latest" and answer["eval_count"] == 2
    sent = json.loads([r for r in llama.seen if r.url.path == "/v1/chat/completions"][0].content)
    assert sent["messages"][0] == {"role": "system", "content": "be brief"} and sent["max_tokens"] == 5


def test_ollama_generate_raw_uses_completions(instance, llama, users, bearer):
    body = {"model": "tiny", "prompt": "once upon", "raw": True}
    status, _, content = request("POST", "/api/generate", body, auth=bearer(users["viewer"]))
    chunks = lines(content)
    assert status == 200 and "".join(c["response"] for c in chunks) == "Hello"
    assert [r.url.path for r in llama.seen if r.url.path != "/props"] == ["/v1/completions"]


def test_an_upstream_error_keeps_the_ollama_shape(instance, llama, users, bearer):
    llama.fail_status = 500
    status, _, content = request("POST", "/api/chat", CHAT, auth=bearer(users["viewer"]))
    assert status == 500 and json.loads(content) == {"error": "upstream says no"}
    assert UsageRecord.objects.get().error == "upstream says no"


def test_openai_stream_is_passed_through_byte_for_byte(instance, llama, users, bearer):
    status, response, content = request(
        "POST", "/v1/chat/completions", {**CHAT, "stream": True}, auth=bearer(users["viewer"])
    )
    assert status == 200 and response["X-Accel-Buffering"] == "no"
    assert response["Content-Type"] == "text/event-stream"
    assert content == b"".join(sse("Hel", "lo", timings=llama.timings))
    record = UsageRecord.objects.get()
    assert (record.prompt_tokens, record.completion_tokens) == (12, 2)


def test_openai_not_streamed_and_models(instance, llama, users, bearer):
    auth = bearer(users["viewer"])
    status, _, content = request("POST", "/v1/chat/completions", CHAT, auth=auth)
    assert status == 200 and json.loads(content)["choices"][0]["message"]["content"] == "Hello"
    models = json.loads(request("GET", "/v1/models", auth=auth)[2])
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == ["tiny"]


def test_embed(instance, llama, users, bearer):
    auth = bearer(users["viewer"])
    status, _, content = request("POST", "/api/embed", {"model": "tiny", "input": ["a", "b"]}, auth=auth)
    answer = json.loads(content)
    assert (
        status == 200 and answer["embeddings"] == [[0.6, 0.8, 0.0]] * 2 and answer["prompt_eval_count"] == 6
    )
    answer = json.loads(
        request("POST", "/api/embed", {"model": "tiny", "input": "a", "dimensions": 1}, auth=auth)[2]
    )
    assert answer["embeddings"] == [[1.0]]
    assert json.loads(request("POST", "/api/embeddings", {"model": "tiny", "prompt": "a"}, auth=auth)[2]) == {
        "embedding": [0.6, 0.8, 0.0]
    }


def test_tags_ps_show_version(instance, llama, users, bearer, tiny_model):
    auth = bearer(users["viewer"])
    assert json.loads(request("GET", "/api/version")[2])["version"].count(".") == 2
    tags = json.loads(request("GET", "/api/tags", auth=auth)[2])["models"]
    assert tags[0]["name"] == tags[0]["model"] == "tiny:latest"
    assert tags[0]["size"] == tiny_model.file_size_bytes and len(tags[0]["digest"]) == 64
    assert tags[0]["details"]["family"] == "llama" and tags[0]["details"]["quantization_level"] == "F32"
    GpuInstance.objects.filter(pk=instance.pk).update(memory_used_mb=100, memory_source="process")
    ps = json.loads(request("GET", "/api/ps", auth=auth)[2])["models"]
    assert ps[0]["name"] == "tiny:latest" and ps[0]["size_vram"] == 100 * 1024 * 1024
    from datetime import datetime

    assert datetime.fromisoformat(ps[0]["expires_at"]).tzinfo is not None
    show = json.loads(request("POST", "/api/show", {"model": "tiny"}, auth=auth)[2])
    assert show["model_info"]["general.architecture"] == "llama" and show["details"]["format"] == "gguf"


# --- slots and the queue ---------------------------------------------------------------------------------


def test_beyond_the_slots_and_the_queue_is_429_and_nothing_stays_held(
    instance, llama, users, bearer, settings
):
    settings.GATEWAY_QUEUE_SIZE = 1
    auth = bearer(users["viewer"])

    async def scenario():
        llama.hold = asyncio.Event()
        client = AsyncClient()

        async def chat():
            response = await client.post(
                "/api/chat",
                data=json.dumps(CHAT),
                content_type="application/json",
                headers={"Authorization": auth},
            )
            return response.status_code, response, await read(response)

        first = asyncio.create_task(chat())  # takes the one slot and holds it (the upstream waits)
        await asyncio.sleep(0.3)
        second = asyncio.create_task(chat())  # waits in the queue
        await asyncio.sleep(0.3)
        status, response, content = await chat()  # beyond the queue
        llama.hold.set()
        results = [await first, await second]
        return status, response, content, results

    status, response, content, results = run(scenario)
    assert status == 429 and response["Retry-After"] == "1" and "busy" in json.loads(content)["error"]
    assert [r[0] for r in results] == [200, 200]
    assert all(lines(r[2])[-1]["done"] for r in results)
    assert sorted(r.status for r in UsageRecord.objects.all()) == [200, 200, 429]
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0


def test_a_client_that_leaves_mid_stream_closes_the_upstream(instance, llama, users, bearer):
    auth = bearer(users["viewer"])

    async def scenario():
        llama.hold = asyncio.Event()
        response = await AsyncClient().post(
            "/api/chat",
            data=json.dumps(CHAT),
            content_type="application/json",
            headers={"Authorization": auth},
        )
        stream = aiter(response.streaming_content)
        first = await anext(stream)
        await stream.aclose()  # what Django does when the client disconnects
        await asyncio.sleep(0.1)
        return first

    first = run(scenario)
    assert json.loads(first)["message"]["content"] == "Hel"
    assert llama.closed == 1
    record = UsageRecord.objects.get()
    assert record.client_disconnected and record.status == 200
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0


def test_keep_alive_zero_with_an_empty_prompt_unloads(instance, llama, users, bearer, monkeypatch):
    from models_app import ondemand
    from models_app.errors import Refused

    asked = []
    monkeypatch.setattr(ondemand, "unload_now", lambda model, actor: asked.append((model.pk, actor.username)))
    body = {"model": "tiny", "prompt": "", "keep_alive": 0}
    status, _, content = request("POST", "/api/generate", body, auth=bearer(users["operator"]))
    assert status == 200 and json.loads(content)["done_reason"] == "unload"
    assert asked == [("tiny", "operator")]

    def refuse(model, actor):
        raise Refused("viewer may not unload instance #1 of tiny", code="forbidden")

    monkeypatch.setattr(ondemand, "unload_now", refuse)
    status, _, content = request(
        "POST", "/api/chat", {"model": "tiny", "keep_alive": "0s"}, auth=bearer(users["viewer"])
    )
    assert status == 403 and "may not unload" in json.loads(content)["error"]


def test_an_empty_prompt_loads_and_answers_done_reason_load(instance, llama, users, bearer):
    status, _, content = request("POST", "/api/generate", {"model": "tiny"}, auth=bearer(users["viewer"]))
    answer = json.loads(content)
    assert status == 200 and answer["done"] is True and answer["done_reason"] == "load"


def test_a_model_not_loaded_is_503_for_a_viewer(tiny_model, fake_gpus, llama, users, bearer):
    """Waking a model needs the operator role unless the model is on demand (models_app.ondemand)."""
    status, _, content = request("POST", "/api/chat", CHAT, auth=bearer(users["viewer"]))
    assert status == 403 and "operator" in json.loads(content)["error"]


def test_a_client_that_leaves_while_queued_leaves_nothing_behind(instance, llama, users, bearer):
    auth = bearer(users["viewer"])

    async def scenario():
        llama.hold = asyncio.Event()
        client = AsyncClient()

        async def chat():
            response = await client.post(
                "/api/chat",
                data=json.dumps(CHAT),
                content_type="application/json",
                headers={"Authorization": auth},
            )
            return await read(response)

        first = asyncio.create_task(chat())
        await asyncio.sleep(0.3)
        queued = asyncio.create_task(chat())
        await asyncio.sleep(0.3)
        queued.cancel()  # Django cancels the view when its client disconnects
        await asyncio.sleep(0.3)
        llama.hold.set()
        await first

    run(scenario)
    statuses = sorted((r.status, r.client_disconnected) for r in UsageRecord.objects.all())
    assert statuses == [(200, False), (499, True)]
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_llama_server_dying_mid_stream_ends_with_an_error_line(path, instance, llama, users, bearer):
    llama.break_after_first = True
    status, _, content = request("POST", path, {**CHAT, "stream": True}, auth=bearer(users["viewer"]))
    assert status == 200  # the stream had begun
    if path == "/api/chat":
        chunks = lines(content)
        assert chunks[0]["message"]["content"] == "Hel"
        assert set(chunks[-1]) == {"error"} and "broke off" in chunks[-1]["error"]
    else:
        last = content.strip().split(b"\n\n")[-1]
        assert last.startswith(b"data: ") and "broke off" in json.loads(last[6:])["error"]["message"]
    record = UsageRecord.objects.get()
    assert "broke off" in record.error and not record.client_disconnected
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0


def test_a_stream_never_started_is_finished_all_the_same(instance, llama, users, bearer):
    """The client left between the view's return and the first byte: the server drops the response
    unread (the view is called directly: the test client keeps every response alive)."""
    import gc

    from django.contrib.auth.models import AnonymousUser
    from django.test import AsyncRequestFactory

    from gateway import views_ollama

    auth = bearer(users["viewer"])

    async def scenario():
        request = AsyncRequestFactory().post(
            "/api/chat",
            data=json.dumps(CHAT),
            content_type="application/json",
            headers={"Authorization": auth},
        )
        request.user = AnonymousUser()
        response = await views_ollama.chat(request)
        assert response.streaming
        del response
        gc.collect()
        await asyncio.sleep(0.3)

    run(scenario)
    record = UsageRecord.objects.get()
    assert record.client_disconnected and record.status == 200
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0
