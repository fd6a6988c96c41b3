"""A stand-in llama-server behind httpx's MockTransport, and helpers to run requests through Django's
AsyncClient from sync tests."""

import asyncio
import json

import httpx
from asgiref.sync import async_to_sync
from django.test import AsyncClient


def sse(*events, timings=None, finish="stop", text=False) -> list[bytes]:
    """llama-server's chat stream (`text`: completions stream): one chunk per piece, then the finish chunk
    with timings, then [DONE]."""
    out = []
    for piece in events:
        choice = {"index": 0, "text": piece} if text else {"index": 0, "delta": {"content": piece}}
        chunk = {"choices": [{**choice, "finish_reason": None}]}
        out.append(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    last = {"choices": [{"index": 0, "finish_reason": finish, **({"text": ""} if text else {"delta": {}})}]}
    if timings:
        last["timings"] = timings
    out.append(b"data: " + json.dumps(last).encode() + b"\n\n")
    out.append(b"data: [DONE]\n\n")
    return out


class FakeLlamaServer:
    """Answers like llama-server: /props, streamed chat and completions, embeddings. `hold` (an Event)
    keeps a stream open until set; `seen` records every request."""

    def __init__(self):
        self.seen: list[httpx.Request] = []
        self.slots = 1
        self.pieces = ["Hel", "lo"]
        self.timings = {
            "cache_n": 2,
            "prompt_n": 10,
            "prompt_ms": 5.5,
            "predicted_n": 2,
            "predicted_ms": 12.25,
        }
        self.hold: asyncio.Event | None = None
        self.closed = 0
        self.fail_status: int | None = None
        self.break_after_first = False  # llama-server dies mid-stream

    async def handler(self, request: httpx.Request) -> httpx.Response:
        self.seen.append(request)
        if request.url.path == "/props":
            return httpx.Response(200, json={"total_slots": self.slots})
        if self.fail_status:
            body = {
                "error": {"code": self.fail_status, "message": "upstream says no", "type": "server_error"}
            }
            return httpx.Response(self.fail_status, json=body)
        body = json.loads(request.content)
        if request.url.path == "/v1/embeddings":
            inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
            data = [{"index": i, "embedding": [0.6, 0.8, 0.0]} for i in range(len(inputs))]
            return httpx.Response(200, json={"data": data, "usage": {"prompt_tokens": 3 * len(inputs)}})
        if not body.get("stream"):
            answer = {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(self.pieces)}}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 2},
                "timings": self.timings,
            }
            return httpx.Response(200, json=answer)
        return httpx.Response(
            200, headers={"content-type": "text/event-stream"}, content=self._stream(request.url.path)
        )

    async def _stream(self, path):
        try:
            chunks = sse(*self.pieces, timings=self.timings, text=path == "/v1/completions")
            yield chunks[0]
            if self.break_after_first:
                raise httpx.RemoteProtocolError(
                    "peer closed connection without sending complete message body"
                )
            if self.hold is not None:
                await self.hold.wait()
            for chunk in chunks[1:]:
                yield chunk
        finally:
            self.closed += 1


def run(scenario):
    """Run an async scenario (requests through Django's AsyncClient) to its end, from a sync test."""
    return async_to_sync(scenario)()


async def read(response) -> bytes:
    if response.streaming:
        return b"".join([chunk async for chunk in response.streaming_content])
    return response.content


def request(method: str, path: str, body=None, *, auth: str | None = None, raw: bytes | None = None):
    """One request to its end: (status, headers, body bytes)."""

    async def scenario():
        client = AsyncClient()
        headers = {"Authorization": auth} if auth else {}
        if method == "GET":
            response = await client.get(path, headers=headers)
        else:
            data = raw if raw is not None else json.dumps(body)
            response = await client.post(path, data=data, content_type="application/json", headers=headers)
        return response.status_code, response, await read(response)

    return run(scenario)
