"""The gateway end to end: the run command's web server (gunicorn with a uvicorn worker, ASGI) against the
test database, a real Celery worker, the real llama-server with the tiny model on simulated GPUs, and the
real `ollama` and `openai` client packages."""

import time

import httpx
import ollama
import openai
import pytest

from accounts.models import ApiToken
from gateway.models import UsageRecord
from models_app import processes
from models_app.models import GpuInstance, ModelConfig
from models_app.services import request_load, request_unload
from tests.conftest import worker_env
from tests.helpers import wait_for, web_server

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Status = GpuInstance.Status


@pytest.fixture
def gateway(celery_worker, tmp_path, settings):
    """The web app as `./lc.sh run` serves it (one worker process), on a free port; its base URL."""
    with web_server(worker_env(), tmp_path / "web.log") as url:
        yield url


@pytest.fixture
def token(users):
    return ApiToken.issue(users["viewer"], "e2e")[1]


@pytest.fixture
def loaded(celery_worker, fake_gpus, tiny_model, settings):
    """The tiny model running on GPU 0 (loaded by hand)."""
    instance = wait_for(
        request_load(model_id="tiny", gpu_spec="0", actor=None), Status.RUNNING, Status.FAILED
    )
    assert instance.status == Status.RUNNING, instance.error
    yield instance
    request_unload(instance=instance, actor=None)
    wait_for(instance, Status.STOPPED)


def test_ollama_client(gateway, loaded, token):
    client = ollama.Client(host=gateway, headers={"Authorization": f"Bearer {token}"})
    assert [m.model for m in client.list().models] == ["tiny:latest"]
    ps = client.ps().models
    assert [m.model for m in ps] == ["tiny:latest"] and ps[0].size_vram >= 0
    show = client.show("tiny")
    assert show.modelinfo["general.architecture"] == "llama" and show.details.format == "gguf"

    answer = client.chat(model="tiny", messages=[{"role": "user", "content": "hi"}], stream=False,
                         options={"num_predict": 8, "seed": 1})  # fmt: skip
    assert answer.done and answer.done_reason in ("stop", "length") and answer.eval_count >= 1
    assert answer.prompt_eval_count > 0 and answer.total_duration >= answer.eval_duration > 0

    chunks = list(client.chat(model="tiny:latest", messages=[{"role": "user", "content": "hi"}], stream=True,
                              options={"num_predict": 8}))  # fmt: skip
    assert chunks[-1].done and not any(c.done for c in chunks[:-1])
    assert chunks[-1].eval_count == len(chunks) - 1 or chunks[-1].eval_count >= 1

    generated = client.generate(model="tiny", prompt="once upon", options={"num_predict": 8})
    assert generated.done and generated.response is not None and generated.eval_count >= 1
    parts = list(client.generate(model="tiny", prompt="once upon", stream=True, options={"num_predict": 8}))
    assert parts[-1].done and parts[-1].eval_duration > 0

    records = UsageRecord.objects.filter(endpoint__in=["/api/chat", "/api/generate"])
    assert records.count() == 4
    assert all(r.status == 200 and r.completion_tokens and r.user.username == "viewer" for r in records)


def test_openai_client(gateway, loaded, token):
    client = openai.OpenAI(base_url=gateway + "/v1", api_key=token)
    assert [m.id for m in client.models.list()] == ["tiny"]
    answer = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    assert answer.choices[0].finish_reason in ("stop", "length") and answer.usage.completion_tokens >= 1
    stream = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=8, stream=True
    )
    chunks = list(stream)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = client.completions.create(model="tiny", prompt="once upon", max_tokens=4)
    assert text.choices[0].text is not None


def test_embeddings(gateway, celery_worker, fake_gpus, tiny_model, token):
    ModelConfig.objects.create(
        id="tiny-embed", name="Tiny, embeddings", path=tiny_model.path,
        cli_params={"c": 256, "t": 1, "embeddings": None, "pooling": "mean"},
        gguf_metadata=tiny_model.gguf_metadata, file_size_bytes=tiny_model.file_size_bytes,
    )  # fmt: skip
    instance = wait_for(
        request_load(model_id="tiny-embed", gpu_spec="1", actor=None), Status.RUNNING, Status.FAILED
    )
    assert instance.status == Status.RUNNING, instance.error
    try:
        client = ollama.Client(host=gateway, headers={"Authorization": f"Bearer {token}"})
        vectors = client.embed(model="tiny-embed", input=["hello", "world"]).embeddings
        assert len(vectors) == 2 and len(vectors[0]) == 64
        assert abs(sum(v * v for v in vectors[0]) - 1) < 1e-3  # normalised, as Ollama's are
        data = openai.OpenAI(base_url=gateway + "/v1", api_key=token).embeddings.create(
            model="tiny-embed", input="hi"
        )
        assert len(data.data[0].embedding) == 64
    finally:
        request_unload(instance=instance, actor=None)
        wait_for(instance, Status.STOPPED)


def test_refusals(gateway, loaded, token):
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=gateway).chat(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert refused.value.status_code == 401
    client = ollama.Client(host=gateway, headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(ollama.ResponseError) as missing:
        client.chat(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert missing.value.status_code == 404 and missing.value.error == "model 'nope' not found"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=gateway + "/v1", api_key="lc_wrong").models.list()
    with pytest.raises(openai.NotFoundError) as not_found:
        openai.OpenAI(base_url=gateway + "/v1", api_key=token).chat.completions.create(
            model="nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert "model 'nope' not found" in str(not_found.value)


def _slots_busy(instance) -> bool:
    answer = httpx.get(
        f"http://127.0.0.1:{instance.port}/slots", headers={"Authorization": f"Bearer {instance.api_key}"}
    )
    return any(slot["is_processing"] for slot in answer.json())


def test_a_client_disconnect_frees_the_slot(gateway, celery_worker, fake_gpus, tiny_model, token):
    """A long answer (one slot, a large context, EOS ignored) abandoned after its first chunk: llama-server
    stops generating at once, and the next request is answered without waiting for the first to end."""
    # The tiny model's header says 512 tokens of context, which llama-server would cap the answer at.
    long_context = {"c": 16384, "np": 1, "t": 1, "override-kv": "llama.context_length=int:16384"}
    ModelConfig.objects.filter(pk="tiny").update(cli_params=long_context)
    instance = wait_for(
        request_load(model_id="tiny", gpu_spec="0", actor=None), Status.RUNNING, Status.FAILED
    )
    assert instance.status == Status.RUNNING, instance.error
    try:
        long_answer = {"model": "tiny", "messages": [{"role": "user", "content": "go"}], "stream": True,
                       "max_tokens": 16000, "ignore_eos": True}  # fmt: skip
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.stream("POST", gateway + "/v1/chat/completions", json=long_answer, headers=headers) as r:
            assert r.status_code == 200
            lines = r.iter_lines()
            while '"content":"' not in next(lines):
                pass  # the role chunk comes first; wait for a token
            assert _slots_busy(instance)
        # The client is gone: the slot is free within moments, not after 16000 tokens.
        deadline = time.monotonic() + 3
        while _slots_busy(instance):
            assert time.monotonic() < deadline, "llama-server kept generating for a client that left"
            time.sleep(0.05)
        started = time.monotonic()
        answer = httpx.post(
            gateway + "/api/generate", json={"model": "tiny", "prompt": "hi", "stream": False,
                                              "options": {"num_predict": 4}}, headers=headers, timeout=30,
        )  # fmt: skip
        assert answer.status_code == 200 and answer.json()["done"]
        assert time.monotonic() - started < 3
        deadline = time.monotonic() + 5
        while not UsageRecord.objects.filter(client_disconnected=True).exists():
            assert time.monotonic() < deadline, list(UsageRecord.objects.values())
            time.sleep(0.05)
        instance.refresh_from_db()
        assert instance.in_flight == 0
        assert processes.health_status(instance.port) == 200
    finally:
        request_unload(instance=instance, actor=None)
        wait_for(instance, Status.STOPPED)


def test_load_on_demand_from_cold_shared_by_concurrent_requests_then_keep_alive_zero(
    gateway, celery_worker, fake_gpus, tiny_model, users, token
):
    from concurrent.futures import ThreadPoolExecutor

    viewer = ollama.Client(host=gateway, headers={"Authorization": f"Bearer {token}"})
    with pytest.raises(ollama.ResponseError) as refused:
        viewer.generate(model="tiny", prompt="hi")
    assert refused.value.status_code == 403 and "operator" in refused.value.error
    assert not GpuInstance.objects.exists()

    operator_token = ApiToken.issue(users["operator"], "e2e")[1]
    operator = ollama.Client(host=gateway, headers={"Authorization": f"Bearer {operator_token}"})

    def ask(n):
        return operator.generate(model="tiny", prompt=f"hi {n}", options={"num_predict": 4}, keep_alive="10m")

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, range(4)))
    assert all(a.done for a in answers) and max(a.load_duration for a in answers) > 0
    [instance] = GpuInstance.objects.all()  # four cold requests, one load
    assert instance.loaded_on_demand and instance.status == Status.RUNNING and instance.in_flight == 0
    [loaded] = viewer.ps().models
    assert loaded.model == "tiny:latest" and loaded.expires_at is not None

    unloaded = operator.generate(model="tiny", prompt="", keep_alive=0)
    assert unloaded.done_reason == "unload"
    wait_for(instance, Status.STOPPED)
    assert viewer.ps().models == []
