"""OpenAI-compatible routes: passed to the instance's own /v1 routes byte for byte (SSE unbuffered)."""

import json
import time

import httpx
from django.conf import settings
from django.http import HttpResponse
from django.views.decorators.csrf import csrf_exempt

from .errors import OPENAI, openai_body
from .exchange import Exchange
from .protocol import Call, hand_over, serve
from .views_common import listable, listing


@csrf_exempt
async def models(request):
    return await listing(request, OPENAI, listable, _model_list)


def _model_list(rows) -> dict:
    data = [
        {
            "id": m.pk,
            "object": "model",
            "created": int(m.created_at.timestamp()),
            "owned_by": "llamacontroller",
        }
        for m in rows
    ]
    return {"object": "list", "data": data}


def _usage_from(exchange: Exchange, payload: dict) -> None:
    usage = payload.get("usage") or {}
    timings = payload.get("timings") or {}
    if timings:
        exchange.prompt_tokens = int(timings.get("cache_n") or 0) + int(timings.get("prompt_n") or 0)
        exchange.completion_tokens = int(timings.get("predicted_n") or 0)
    elif usage:
        exchange.prompt_tokens = usage.get("prompt_tokens")
        exchange.completion_tokens = usage.get("completion_tokens")


class _SseWatcher:
    """Reads the passing stream for the figures (first token, timings/usage) without holding it up."""

    def __init__(self, exchange: Exchange):
        self.exchange = exchange
        self.rest = b""

    def feed(self, chunk: bytes) -> None:
        data = self.rest + chunk if self.rest else chunk
        if (
            self.exchange.first_token_at is not None
            and b'"timings"' not in data
            and b'"usage"' not in data
            and b'"error"' not in data
        ):
            # Most chunks once the first token is seen: one token each, nothing to read. Keep only an
            # unfinished line (a key could be cut between chunks).
            cut = data.rfind(b"\n")
            self.rest = data[cut + 1 :]
            return
        lines = data.split(b"\n")
        self.rest = lines.pop()
        for line in lines:
            if not line.startswith(b"data: {"):
                continue
            first = self.exchange.first_token_at is None
            if not first and b'"timings"' not in line and b'"usage"' not in line:
                continue
            try:
                event = json.loads(line[6:])
            except ValueError:
                continue
            if first:
                for choice in event.get("choices") or []:
                    delta = choice.get("delta") or {}
                    if (
                        choice.get("text")
                        or delta.get("content")
                        or delta.get("reasoning_content")
                        or (delta.get("tool_calls"))
                    ):
                        self.exchange.mark_first_token()
            if event.get("error"):
                self.exchange.error = str((event["error"] or {}).get("message") or event["error"])[:2000]
            _usage_from(self.exchange, event)


async def _passthrough(exchange: Exchange, response: httpx.Response):
    watcher = _SseWatcher(exchange)
    deadline = exchange.deadline()
    try:
        # The body's own stream (what aiter_raw reads, less its chunker and byte count: nothing is decoded)
        async for chunk in response.stream:
            yield chunk
            watcher.feed(chunk)
            if time.perf_counter() > deadline:
                exchange.error = f"stopped at the {settings.GATEWAY_MAX_REQUEST_SECONDS}s cap"
                yield b"data: " + openai_body(504, exchange.error, "timeout") + b"\n\n"
                return
    except httpx.HTTPError as exc:
        exchange.error = f"the model's server broke off the answer: {exc or exc.__class__.__name__}"
        yield b"data: " + openai_body(502, exchange.error, "upstream_error") + b"\n\n"


async def _proxy(call: Call):
    """The request passed to the instance's route of the same path (the exchange's endpoint)."""
    exchange = call.exchange
    await exchange.begin(call.request, call.body)
    stream = call.body.get("stream") is True
    response = await exchange.send(exchange.endpoint, call.raw, stream=stream)
    exchange.status = response.status_code
    if stream and response.status_code == 200:
        content_type = response.headers.get("content-type", "text/event-stream")
        return hand_over(exchange, _passthrough(exchange, response), content_type)
    content = await response.aread() if stream else response.content
    try:
        payload = json.loads(content)
    except ValueError:
        payload = {}
    if isinstance(payload, dict):
        _usage_from(exchange, payload)
        if response.status_code >= 400:
            exchange.error = str((payload.get("error") or {}).get("message") or content[:500])
        elif exchange.completion_tokens and payload.get("timings"):
            # Not streamed: the first token came predicted_ms before the end.
            predicted = float(payload["timings"].get("predicted_ms") or 0) / 1000
            exchange.first_token_at = time.perf_counter() - predicted
    return HttpResponse(
        content,
        status=response.status_code,
        content_type=response.headers.get("content-type", "application/json"),
    )


@csrf_exempt
async def chat_completions(request):
    return await serve(request, OPENAI, "/v1/chat/completions", _proxy)


@csrf_exempt
async def completions(request):
    return await serve(request, OPENAI, "/v1/completions", _proxy)


@csrf_exempt
async def embeddings(request):
    return await serve(request, OPENAI, "/v1/embeddings", _proxy)
