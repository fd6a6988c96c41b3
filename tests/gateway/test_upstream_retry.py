"""The gateway under load against a llama-server's keep-alive: a request that broke before any byte reached the
client is tried once more on a new connection, and the upstream pool forgets idle connections before
llama-server closes them (issue: 4 of 80 streams answered 502 "Server disconnected without sending a response").

The upstream here is a stand-in llama-server on a real socket (KeepAliveServer); tests/e2e/test_gateway_load.py
runs the same 16 streams against the real one."""

import asyncio
import json
import threading
import time

import httpx
import pytest
from django.test import AsyncClient

from gateway import slots, upstream
from gateway.models import UsageRecord
from models_app.models import GpuInstance
from tests.gateway.fakes import read, run

pytestmark = pytest.mark.django_db(transaction=True)

CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}


class KeepAliveServer:
    """A stand-in llama-server that treats kept-alive connections as cpp-httplib does: it closes one left idle
    for `idle_close` seconds, and a request that arrives on a connection idle for `drop_after` seconds or more is
    read and then dropped without an answer — the server's keep-alive timer firing just as the request came in
    ("Server disconnected without sending a response" at the client), made certain instead of a race."""

    def __init__(self, *, slots: int = 4, idle_close: float = 1.0, drop_after: float = 0.2, chunk_delay=0.01):
        self.slots, self.idle_close, self.drop_after, self.chunk_delay = (
            slots,
            idle_close,
            drop_after,
            chunk_delay,
        )
        self.dropped = 0  # requests read and left without an answer
        self.answered = 0
        self.connections = 0
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="keepalive-server", daemon=True)

    def __enter__(self):
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def __exit__(self, *exc):
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    def _run(self):
        self._loop.run_until_complete(self._main())
        self._loop.close()

    async def _main(self):
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        await self._stop.wait()
        server.close()
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for task in others:
            task.cancel()
        await asyncio.gather(*others, return_exceptions=True)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.connections += 1
        idle_since = None  # None: a new connection (its first request is never dropped)
        try:
            while True:
                try:
                    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_close)
                except (TimeoutError, asyncio.IncompleteReadError):
                    return  # idle too long (or the client closed it): close, as the server does
                lines = head.decode().split("\r\n")
                method, path, _ = lines[0].split(" ", 2)
                headers = {
                    k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                if idle_since is not None and time.monotonic() - idle_since >= self.drop_after:
                    self.dropped += 1
                    return
                await self._answer(writer, method, path, body)
                self.answered += 1
                idle_since = time.monotonic()
        finally:
            writer.close()

    async def _answer(self, writer, method, path, body):
        if method == "GET" and path == "/props":
            payload = json.dumps({"total_slots": self.slots}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            writer.write(b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            return await writer.drain()
        request = json.loads(body or b"{}")
        if not request.get("stream"):
            answer = {
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello"}}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            }
            payload = json.dumps(answer).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
            writer.write(b"Content-Length: %d\r\n\r\n" % len(payload) + payload)
            return await writer.drain()
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        events = [{"choices": [{"index": 0, "delta": {"content": piece}}]} for piece in ("Hel", "lo")]
        events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}})
        for event in events:
            await asyncio.sleep(self.chunk_delay)
            self._chunk(writer, b"data: " + json.dumps(event).encode() + b"\n\n")
            await writer.drain()
        self._chunk(writer, b"data: [DONE]\n\n")
        writer.write(b"0\r\n\r\n")
        await writer.drain()

    @staticmethod
    def _chunk(writer, data: bytes):
        writer.write(b"%x\r\n" % len(data) + data + b"\r\n")


@pytest.fixture
def keepalive_server(instance):
    """The stand-in serving `instance` (tests/gateway/conftest.py), with the gateway's real httpx clients."""
    with KeepAliveServer() as server:
        GpuInstance.objects.filter(pk=instance.pk).update(port=server.port)
        slots._gates.clear()
        yield server
    slots._gates.clear()


async def chat(client: AsyncClient, auth: str, *, stream: bool) -> tuple[int, bytes]:
    response = await client.post(
        "/v1/chat/completions",
        data=json.dumps({**CHAT, "stream": stream}),
        content_type="application/json",
        headers={"Authorization": auth},
    )
    return response.status_code, await read(response)


@pytest.mark.parametrize("stream", [True, False])
def test_a_request_on_a_connection_the_server_just_closed_is_sent_again(
    keepalive_server, instance, users, bearer, stream
):
    auth = bearer(users["viewer"])

    async def scenario():
        client = AsyncClient()
        first = await chat(client, auth, stream=stream)
        await asyncio.sleep(
            0.3
        )  # idle past drop_after, within the pool's keep-alive: the connection is reused
        return first, await chat(client, auth, stream=stream)

    first, second = run(scenario)
    assert first[0] == 200 and second[0] == 200, second
    assert b"Hel" in second[1] or b"Hello" in second[1]
    assert keepalive_server.dropped >= 1  # the second went out on the kept connection, which was dropped
    assert sorted(UsageRecord.objects.values_list("status", flat=True)) == [200, 200]
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 0


def test_16_concurrent_streams_for_5_rounds_answer_no_5xx(keepalive_server, users, bearer):
    """The issue's load: 16 streams at once to a model with 4 slots (-np 4), 5 rounds, with pauses between
    rounds that leave kept-alive connections idle into the server's closing."""
    auth = bearer(users["viewer"])

    async def scenario():
        client = AsyncClient()
        statuses = []
        for _ in range(5):
            answers = await asyncio.gather(*[chat(client, auth, stream=True) for _ in range(16)])
            statuses += [status for status, _ in answers]
            assert all(b"data: [DONE]" in body for _, body in answers)
            await asyncio.sleep(0.3)
        return statuses

    statuses = run(scenario)
    assert statuses == [200] * 80
    assert keepalive_server.dropped >= 1  # the retry was needed: some went out on connections being closed
    assert not UsageRecord.objects.filter(status__gte=500).exists()
    assert UsageRecord.objects.filter(status=200).count() == 80


def test_the_upstream_pool_forgets_idle_connections_before_llama_server_closes_them():
    """llama-server (cpp-httplib) closes a connection idle for 5 s: a pooled one must not be older."""

    async def scenario():
        return upstream.transport(), upstream.fresh_transport()

    pooled, fresh = run(scenario)
    assert pooled.keepalive_expiry < 5
    assert fresh.max_keepalive == 0  # the retry: always a new connection
    assert issubclass(httpx.RemoteProtocolError, upstream.RETRYABLE)
    assert not issubclass(httpx.ConnectError, upstream.RETRYABLE)  # refused: a new connection fares no better
