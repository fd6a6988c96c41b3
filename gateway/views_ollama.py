"""Ollama-compatible routes, translated to and from llama-server's OpenAI-compatible stream (NDJSON out,
one JSON object per line, never an empty line)."""

import json
import time
from datetime import UTC, datetime
from functools import partial

import httpx
import orjson
from django.conf import settings
from django.http import HttpResponseNotAllowed, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from . import access, model_facts, translate
from .db import db
from .errors import OLLAMA, GatewayError, error_response, model_name_problem
from .exchange import Exchange, read_json
from .model_facts import tagged
from .protocol import Call, hand_over, serve
from .translate import StreamState
from .views_common import listable, listing

NDJSON = "application/x-ndjson"
FAR_FUTURE = datetime(2318, 1, 1, tzinfo=UTC)  # Ollama's "never" (keep_alive < 0)


def _line(obj: dict) -> bytes:
    """One NDJSON line (UTF-8, compact, as Ollama writes them). orjson: a fifth of json's time per chunk;
    json for what orjson refuses (an integer past 64 bits in a tool call's arguments)."""
    try:
        return orjson.dumps(obj, option=orjson.OPT_APPEND_NEWLINE)
    except TypeError:
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n"


def _loads(data: bytes):
    """orjson's parse; json's where orjson refuses what json reads (e.g. an integer past 64 bits)."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _error_message(content: bytes) -> str:
    try:
        payload = json.loads(content)
    except ValueError:
        return content[:500].decode(errors="replace") or "the model's server answered an error"
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(error or payload)


# --- listing --------------------------------------------------------------------------------------------


@csrf_exempt
async def version(request):
    return JsonResponse({"version": translate.OLLAMA_VERSION})


def _modified_at(model) -> str:
    return model.updated_at.astimezone(UTC).isoformat()


def _describe(model) -> dict:
    return {
        "name": tagged(model.pk),
        "model": tagged(model.pk),
        "modified_at": _modified_at(model),
        "size": int(model.file_size_bytes or 0),
        "digest": model_facts.digest(model.path, model.file_size_bytes),
        "details": model_facts.details(model.gguf_metadata),
    }


@csrf_exempt
async def tags(request):
    return await listing(request, OLLAMA, listable, lambda rows: {"models": [_describe(m) for m in rows]})


def _context_length(instance) -> int | None:
    params = instance.model.cli_params or {}
    for name in ("c", "ctx-size", "-c", "--ctx-size"):
        if str(params.get(name, "")).isdigit():
            return int(params[name])
    return (instance.model.gguf_metadata or {}).get("context_length")


def _running(request) -> list[dict]:
    from models_app.models import GpuInstance

    caller = access.authenticate(request)
    allowed = {m.pk for m in access.listable_models(caller)}
    instances = (
        GpuInstance.objects.filter(status=GpuInstance.Status.RUNNING, model_id__in=allowed)
        .select_related("model", "host")
        .order_by("loaded_at")
    )
    rows = []
    for instance in instances:
        measured = instance.memory_used_mb is not None and instance.memory_source != "none"
        vram = int(instance.memory_used_mb) * 1024 * 1024 if measured else 0
        expires = access.expires_at(instance) or FAR_FUTURE
        row = _describe(instance.model)
        del row["modified_at"]
        row.update(
            size=vram or row["size"],
            size_vram=vram,
            expires_at=expires.astimezone(UTC).isoformat(),
            context_length=_context_length(instance),
        )
        rows.append(row)
    rows.sort(key=lambda r: r["expires_at"])
    return rows


@csrf_exempt
async def ps(request):
    return await listing(request, OLLAMA, _running, lambda rows: {"models": rows})


def _show(request, body):
    caller = access.authenticate(request)
    name = body.get("model") or body.get("name")
    problem = model_name_problem(name)
    if problem is not None:
        raise problem
    model = access.find_model(caller, name)
    facts = model.gguf_metadata or {}
    capabilities = ["embedding"] if "embeddings" in (model.cli_params or {}) else ["completion"]
    return {
        "license": "",
        "modelfile": f"FROM {model.path}\n",
        "parameters": "\n".join(f"{k} {v}" for k, v in (model.cli_params or {}).items()),
        "template": "",
        "details": model_facts.details(facts),
        "model_info": model_facts.model_info(facts),
        "capabilities": capabilities,
        "modified_at": _modified_at(model),
    }


@csrf_exempt
async def show(request):
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    try:
        _, body = await read_json(request)
        return JsonResponse(await db(_show)(request, body))
    except GatewayError as exc:
        return error_response(OLLAMA, exc)


# --- generate and chat ----------------------------------------------------------------------------------


async def _events(exchange: Exchange, response: httpx.Response, state: StreamState):
    """Ollama chunks (dicts) from the upstream SSE stream, ending with the `done` chunk, or with an
    `{"error": ...}` when the stream breaks."""
    deadline = exchange.deadline()
    try:
        async for data in _data_fields(response):
            if data == b"[DONE]":
                break
            try:
                event = _loads(data)
            except ValueError:
                continue
            if not isinstance(event, dict):
                continue
            if event.get("error"):
                exchange.error = _error_message(data)
                yield {"error": exchange.error}
                return
            for chunk in state.feed(event):
                exchange.mark_first_token()
                yield chunk
            if time.perf_counter() > deadline:
                exchange.error = f"stopped at the {settings.GATEWAY_MAX_REQUEST_SECONDS}s cap"
                yield {"error": exchange.error}
                return
    except httpx.HTTPError as exc:
        exchange.error = f"the model's server broke off the answer: {exc or exc.__class__.__name__}"
        yield {"error": exchange.error}
        return
    exchange.prompt_tokens, exchange.completion_tokens = state.prompt_tokens, state.completion_tokens
    total_ns = int((time.perf_counter() - exchange.started) * 1e9)
    for chunk in state.final(total_ns=total_ns, load_ns=int(exchange.load_seconds * 1e9)):
        yield chunk


async def _data_fields(response: httpx.Response):
    """The `data:` fields of an SSE stream, as bytes (blank separators and comments skipped): split here, not
    decoded to text first (httpx's aiter_lines), since orjson reads bytes."""
    rest = b""
    async for piece in response.stream:
        if rest:
            piece = rest + piece
        *lines, rest = piece.split(b"\n")
        for line in lines:
            if line.startswith(b"data: "):
                yield line[6:].strip()
    if rest.startswith(b"data: "):
        yield rest[6:].strip()


async def _ndjson(exchange: Exchange, response: httpx.Response, state: StreamState):
    async for chunk in _events(exchange, response, state):
        yield _line(chunk)


def _no_prompt_answer(model_name: str, kind: str, reason: str, load_ns: int) -> dict:
    answer = {"model": model_name, "created_at": translate.now_iso(), "done": True, "done_reason": reason}
    if kind == "chat":
        answer["message"] = {"role": "assistant", "content": ""}
    else:
        answer["response"] = ""
    if reason == "load":
        answer.update(total_duration=load_ns, load_duration=load_ns)
    return answer


async def _unload(request, exchange: Exchange, body: dict) -> None:
    def run():
        target = access.resolve(request, body.get("model"))
        exchange.target = target
        access.unload(target.caller, target.model)

    await db(run)()


def _generate_or_chat_checks(body: dict, kind: str) -> tuple[str, dict, bool, int | None]:
    """The upstream route and body, whether the prompt is empty, and the keep_alive (BadRequest: 400)."""
    if kind == "chat":
        route, upstream_body = "/v1/chat/completions", translate.chat_request(body)
        empty = not body.get("messages")
    else:
        route, upstream_body = translate.generate_request(body)
        empty = not body.get("prompt")
    return route, upstream_body, empty, translate.keep_alive_seconds(body.get("keep_alive"))


async def _generate_or_chat(call: Call, kind: str):
    exchange, body = call.exchange, call.body
    route, upstream_body, empty, keep_alive = call.checked
    name = body["model"]
    if empty and keep_alive == 0:
        exchange.model_name = name
        await _unload(call.request, exchange, body)
        return JsonResponse(_no_prompt_answer(name, kind, "unload", 0))
    await exchange.begin(call.request, body)
    if empty:
        # An empty prompt loads the model (and sets its keep_alive), as Ollama's clients expect.
        load_ns = int((time.perf_counter() - exchange.started) * 1e9)
        return JsonResponse(_no_prompt_answer(name, kind, "load", load_ns))
    stream = body.get("stream", True) is not False
    response = await exchange.send(route, json.dumps(upstream_body).encode(), stream=True)
    if response.status_code != 200:
        exchange.status = response.status_code
        raise GatewayError(response.status_code, _error_message(await response.aread()))
    state = StreamState(name, kind)
    if stream:
        return hand_over(exchange, _ndjson(exchange, response, state), NDJSON)
    chunks = [chunk async for chunk in _events(exchange, response, state)]
    if "error" in chunks[-1]:
        raise GatewayError(502, chunks[-1]["error"])
    return JsonResponse(translate.merge_chunks(chunks, kind))


def _serve_generate_or_chat(request, kind: str):
    checks, answer = partial(_generate_or_chat_checks, kind=kind), partial(_generate_or_chat, kind=kind)
    return serve(request, OLLAMA, f"/api/{kind}", answer, checks)


@csrf_exempt
async def generate(request):
    return await _serve_generate_or_chat(request, "generate")


@csrf_exempt
async def chat(request):
    return await _serve_generate_or_chat(request, "chat")


# --- embeddings -----------------------------------------------------------------------------------------


def _embed_checks(body: dict, field: str) -> tuple[list, int | None]:
    """The inputs and the dimensions asked for (BadRequest: 400)."""
    inputs = translate.embed_inputs(body, field)
    dimensions = body.get("dimensions")
    translate.truncate_embedding([1.0], dimensions)
    return inputs, dimensions


async def _embed(call: Call, field: str):
    exchange, body = call.exchange, call.body
    inputs, dimensions = call.checked
    await exchange.begin(call.request, body)
    payload = {"model": body["model"], "input": inputs}
    response = await exchange.send("/v1/embeddings", json.dumps(payload).encode(), stream=False)
    exchange.status = response.status_code
    if response.status_code != 200:
        raise GatewayError(response.status_code, _error_message(response.content))
    answer = response.json()
    exchange.mark_first_token()
    vectors = [
        translate.truncate_embedding(item["embedding"], dimensions)
        for item in sorted(answer.get("data") or [], key=lambda item: item.get("index", 0))
    ]
    exchange.prompt_tokens = (answer.get("usage") or {}).get("prompt_tokens")
    total_ns = int((time.perf_counter() - exchange.started) * 1e9)
    if field == "prompt":  # the older /api/embeddings
        return JsonResponse({"embedding": vectors[0] if vectors else []})
    return JsonResponse(
        {
            "model": body["model"],
            "embeddings": vectors,
            "total_duration": total_ns,
            "load_duration": int(exchange.load_seconds * 1e9),
            "prompt_eval_count": exchange.prompt_tokens or 0,
        }
    )


def _serve_embed(request, endpoint: str, field: str):
    return serve(request, OLLAMA, endpoint, partial(_embed, field=field), partial(_embed_checks, field=field))


@csrf_exempt
async def embed(request):
    return await _serve_embed(request, "/api/embed", "input")


@csrf_exempt
async def embeddings(request):
    return await _serve_embed(request, "/api/embeddings", "prompt")
