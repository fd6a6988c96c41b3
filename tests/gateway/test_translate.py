"""Ollama <-> llama-server translation: plain functions, no database."""

import asyncio
import json

import pytest

from gateway import model_facts, translate
from gateway.errors import GatewayError
from gateway.slots import Gate, configured_slots
from gateway.translate import BadRequest, StreamState


def test_timings_become_ollama_nanoseconds():
    timings = {"cache_n": 27, "prompt_n": 1, "prompt_ms": 0.363, "predicted_n": 4, "predicted_ms": 0.231}
    fields = translate.timing_fields(timings, None, total_ns=5_000_000, load_ns=1_000)
    assert fields == {
        "total_duration": 5_000_000,
        "load_duration": 1_000,
        "prompt_eval_count": 28,  # cached tokens count too, as in Ollama's own mapping
        "prompt_eval_duration": 363_000,
        "eval_count": 4,
        "eval_duration": 231_000,
    }
    assert all(isinstance(v, int) for v in fields.values())
    from_usage = translate.timing_fields(
        None, {"prompt_tokens": 5, "completion_tokens": 2}, total_ns=1, load_ns=0
    )
    assert from_usage["prompt_eval_count"] == 5 and from_usage["eval_count"] == 2


def _event(content=None, finish=None, **extra):
    delta = {} if content is None else {"content": content}
    return {"choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}


def test_chat_stream_chunks_and_the_final_chunk():
    state = StreamState("tiny:latest", "chat")
    assert state.feed({"choices": [{"index": 0, "delta": {"role": "assistant", "content": None}}]}) == []
    [chunk] = state.feed(_event("Hel"))
    assert chunk["message"] == {"role": "assistant", "content": "Hel"} and chunk["done"] is False
    assert chunk["model"] == "tiny:latest" and chunk["created_at"].endswith("Z")
    state.feed(_event("lo"))
    timings = {"cache_n": 0, "prompt_n": 3, "prompt_ms": 1.0, "predicted_n": 2, "predicted_ms": 2.0}
    assert state.feed(_event(finish="length", timings=timings)) == []
    [final] = state.final(total_ns=9, load_ns=0)
    assert final["done"] is True and final["done_reason"] == "length"
    assert final["message"] == {"role": "assistant", "content": ""}
    assert (final["eval_count"], final["eval_duration"], final["prompt_eval_count"]) == (2, 2_000_000, 3)
    assert (state.prompt_tokens, state.completion_tokens) == (3, 2)


def test_thinking_and_tool_calls():
    state = StreamState("m", "chat")
    [chunk] = state.feed({"choices": [{"delta": {"reasoning_content": "hmm"}}]})
    assert chunk["message"]["thinking"] == "hmm" and chunk["message"]["content"] == ""
    call = {"index": 0, "function": {"name": "get_weather", "arguments": '{"city": '}}
    state.feed({"choices": [{"delta": {"tool_calls": [call]}}]})
    state.feed(
        {"choices": [{"delta": {"tool_calls": [{"index": 0, "function": {"arguments": '"Paris"}'}}]}}]}
    )
    state.feed(_event(finish="tool_calls"))
    calls, final = state.final(total_ns=1, load_ns=0)
    assert calls["message"]["tool_calls"] == [
        {"function": {"index": 0, "name": "get_weather", "arguments": {"city": "Paris"}}}
    ]
    assert final["done_reason"] == "stop"


def test_generate_chunks_and_merging_a_non_stream_answer():
    state = StreamState("m", "generate")
    chunks = state.feed({"choices": [{"index": 0, "text": "once", "finish_reason": None}]})
    chunks += state.feed({"choices": [{"index": 0, "text": " upon", "finish_reason": "stop"}]})
    chunks += state.final(total_ns=1, load_ns=0)
    assert [c["response"] for c in chunks] == ["once", " upon", ""]
    merged = translate.merge_chunks(chunks, "generate")
    assert merged["response"] == "once upon" and merged["done"] is True
    chat = StreamState("m", "chat")
    parts = chat.feed(_event("a")) + chat.feed(_event("b")) + chat.final(total_ns=1, load_ns=0)
    assert translate.merge_chunks(parts, "chat")["message"] == {"role": "assistant", "content": "ab"}


def test_requests_translate_to_openai():
    body = {
        "model": "tiny:latest",
        "messages": [{"role": "user", "content": "look", "images": ["aGk="]}],
        "options": {"temperature": 0.2, "num_predict": -1, "num_ctx": 4096, "top_k": 5, "stop": ["\n"]},
        "format": "json",
        "think": False,
    }
    out = translate.chat_request(body)
    assert out["stream"] is True and out["temperature"] == 0.2 and out["top_k"] == 5 and out["stop"] == ["\n"]
    assert "max_tokens" not in out and "num_ctx" not in out
    assert out["response_format"] == {"type": "json_object"}
    assert out["chat_template_kwargs"] == {"enable_thinking": False}
    assert out["messages"][0]["content"][1]["image_url"]["url"] == "data:image/png;base64,aGk="
    route, generate = translate.generate_request(
        {"model": "m", "prompt": "p", "system": "s", "options": {"num_predict": 3}}
    )
    assert route == "/v1/chat/completions" and generate["max_tokens"] == 3
    assert generate["messages"] == [{"role": "system", "content": "s"}, {"role": "user", "content": "p"}]
    route, raw = translate.generate_request({"model": "m", "prompt": "p", "raw": True})
    assert route == "/v1/completions" and raw["prompt"] == "p"
    schema = {"type": "object"}
    assert (
        translate.chat_request({"model": "m", "format": schema})["response_format"]["json_schema"]["schema"]
        == schema
    )
    with pytest.raises(BadRequest):
        translate.chat_request({"model": "m", "messages": "hi"})
    with pytest.raises(BadRequest):
        translate.chat_request({"model": "m", "messages": [{"content": "no role"}]})
    with pytest.raises(BadRequest):
        translate.chat_request({"model": "m", "options": [1]})


@pytest.mark.parametrize(
    "value, seconds",
    [
        (None, None),
        (0, 0),
        ("0", 0),
        ("0s", 0),
        (300, 300),
        ("5m", 300),
        ("1h30m", 5400),
        ("1.5s", 2),
        (-1, -1),
        ("-1m", -1),
    ],
)
def test_keep_alive(value, seconds):
    assert translate.keep_alive_seconds(value) == seconds


@pytest.mark.parametrize("value", ["soon", "5 minutes", True, [1], "nan"])
def test_bad_keep_alive(value):
    with pytest.raises(BadRequest):
        translate.keep_alive_seconds(value)


def test_names_and_model_facts():
    assert (
        model_facts.model_id_of("gemma3:latest") == "gemma3" and model_facts.model_id_of("gemma3") == "gemma3"
    )
    assert model_facts.tagged("gemma3") == "gemma3:latest"
    assert (
        model_facts.parameter_size(8_030_261_248) == "8.0B"
        and model_facts.parameter_size(268_098_176) == "268.10M"
    )
    assert model_facts.quantization_level(15) == "Q4_K_M" and model_facts.quantization_level(0) == "F32"
    assert model_facts.quantization_level(1) == "F16"
    assert (
        model_facts.digest("/m/a.gguf", 10)
        == model_facts.digest("/m/a.gguf", 10)
        != model_facts.digest("/m/a.gguf", 11)
    )
    details = model_facts.details({"architecture": "gemma3", "parameter_count": 268_098_176, "file_type": 15})
    assert details == {
        "parent_model": "", "format": "gguf", "family": "gemma3", "families": ["gemma3"],
        "parameter_size": "268.10M", "quantization_level": "Q4_K_M",
    }  # fmt: skip
    info = model_facts.model_info({"architecture": "llama", "context_length": 512, "parameter_count": 5})
    assert info == {
        "general.architecture": "llama",
        "general.parameter_count": 5,
        "llama.context_length": 512,
    }
    assert model_facts.model_info({}) == {}
    json.dumps(info)


def test_embedding_dimensions():
    assert translate.truncate_embedding([3.0, 4.0, 12.0], 2) == [0.6, 0.8]
    assert translate.truncate_embedding([1.0, 2.0], None) == [1.0, 2.0]
    with pytest.raises(BadRequest):
        translate.truncate_embedding([1.0], -1)
    assert translate.embed_inputs({"input": "a"}) == ["a"]
    with pytest.raises(BadRequest):
        translate.embed_inputs({"input": []})


def test_configured_slots():
    assert configured_slots({"np": 4}) == 4 and configured_slots({"parallel": "2"}) == 2
    assert configured_slots({"np": -1}) is None and configured_slots({}) is None


def test_gate_queue_handover_and_cancellation():
    async def scenario():
        gate = Gate(1)
        await gate.enter(queue_size=2)
        waiting = asyncio.create_task(gate.enter(queue_size=2))
        leaving = asyncio.create_task(gate.enter(queue_size=2))
        await asyncio.sleep(0)
        assert gate.waiting == 2
        with pytest.raises(GatewayError) as refused:
            await gate.enter(queue_size=2)
        assert refused.value.status == 429 and refused.value.retry_after == 1
        leaving.cancel()  # a client that gives up while queued leaves no trace
        await asyncio.sleep(0)
        assert gate.waiting == 1
        gate.leave()  # the slot passes to the next in line
        await waiting
        assert gate.busy == 1 and not gate.waiting
        gate.leave()
        assert gate.busy == 0
        # A slot handed over to a waiter that is cancelled at that moment is passed on, not lost.
        await gate.enter(queue_size=1)
        late = asyncio.create_task(gate.enter(queue_size=1))
        await asyncio.sleep(0)
        gate.leave()
        late.cancel()
        with pytest.raises(asyncio.CancelledError):
            await late
        assert gate.busy == 0 and not gate.waiting

    asyncio.run(scenario())
