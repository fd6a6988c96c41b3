"""The gateway's HTTP/1.1 transport (gateway/http11.py) against a real socket: bodies framed every way
llama-server frames them, split anywhere; connections kept and reused only when that is safe; every failure as
the httpx exception that Exchange.send and the streams expect."""

import asyncio

import httpx
import pytest

from gateway.http11 import LlamaTransport


class Server:
    """Answers each request with the next of `answers` (raw bytes, written in the pieces given, `pause` seconds
    apart; a None piece closes the connection there); an answer None closes it without a word."""

    def __init__(self, *answers, pause=0.0, port=0):
        self.answers = list(answers)
        self.pause = pause
        self.port = port
        self.connections = 0
        self.requests: list[bytes] = []

    async def __aenter__(self):
        self.server = await asyncio.start_server(self.serve, "127.0.0.1", self.port)
        self.url = f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc):
        self.server.close()

    async def serve(self, reader, writer):
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = (
                    int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
                    if b"ength: " in head
                    else 0
                )
                self.requests.append(head + await reader.readexactly(length))
                answer = self.answers.pop(0)
                if answer is None:
                    break
                for piece in answer:
                    if piece is None:
                        return
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(self.pause)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


CHUNKED = [b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
           b"7\r\ndata: 1\r\n", b"7\r\ndata:", b" 2\r\n7\r\ndata: 3\r\n0\r", b"\n\r\n"]  # fmt: skip


def fixed(body: bytes, extra=b"") -> list[bytes]:
    return [b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n%s\r\n" % (len(body), extra) + body]


def client(**kwargs) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=LlamaTransport(**kwargs), timeout=2.0)


def test_bodies_split_anywhere_come_out_whole_and_the_connection_is_reused():
    async def scenario():
        async with Server(CHUNKED, fixed(b'{"a": 1}'), CHUNKED) as server, client() as c:
            async with c.stream("POST", server.url + "/v1/chat/completions", content=b"{}") as response:
                pieces = [piece async for piece in response.aiter_raw()]
            answer = await c.post(server.url + "/v1/embeddings", content=b'{"x": 1}')
            text = (await c.post(server.url + "/v1/chat/completions", content=b"{}")).content
            return pieces, answer, text, server

    pieces, answer, text, server = asyncio.run(scenario())
    assert b"".join(pieces) == b"data: 1data: 2data: 3" and len(pieces) >= 2  # passed on as they came
    assert answer.status_code == 200 and answer.json() == {"a": 1}
    assert text == b"data: 1data: 2data: 3"
    assert server.connections == 1  # kept alive between the three
    assert server.requests[1].startswith(b"POST /v1/embeddings HTTP/1.1\r\n")
    assert (
        server.requests[1].endswith(b'\r\n\r\n{"x": 1}')
        and b"content-length: 8" in server.requests[1].lower()
    )


def test_a_connection_the_server_closes_is_not_reused():
    async def scenario():
        async with Server(fixed(b"1", b"Connection: close\r\n"), fixed(b"2")) as server, client() as c:
            first = (await c.get(server.url + "/props")).content
            await asyncio.sleep(0.05)
            second = (await c.get(server.url + "/props")).content
            return first, second, server.connections

    assert asyncio.run(scenario()) == (b"1", b"2", 2)


def test_idle_connections_expire_and_none_are_kept_without_keepalive():
    async def scenario():
        async with Server(fixed(b"1"), fixed(b"2"), fixed(b"3")) as server:
            async with client(keepalive_expiry=0.05) as c:
                await c.get(server.url + "/props")
                await asyncio.sleep(0.1)
                await c.get(server.url + "/props")
            kept_none = server.connections
            async with client(max_keepalive=0) as c:
                await c.get(server.url + "/props")
            return kept_none, server.connections

    # The server answers its answers in order whichever connection asks; only the counts matter here.
    assert asyncio.run(scenario()) == (2, 3)


def test_failures_are_httpx_exceptions():
    async def scenario():
        results = []
        async with Server(None, [CHUNKED[0], CHUNKED[1], None]) as server, client() as c:
            for _ in range(2):
                try:
                    async with c.stream("POST", server.url + "/v1/completions", content=b"{}") as response:
                        async for _ in response.aiter_raw():
                            pass
                except httpx.HTTPError as exc:
                    results.append((type(exc), str(exc)))
        slow = Server([b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nab"], pause=1.0)
        async with slow as server, httpx.AsyncClient(transport=LlamaTransport(), timeout=0.2) as c:
            try:
                await c.get(server.url + "/props")
            except httpx.HTTPError as exc:
                results.append((type(exc), ""))
        async with client() as c:
            try:
                await c.get("http://127.0.0.1:9/")  # nothing listens on the discard port
            except httpx.HTTPError as exc:
                results.append((type(exc), ""))
        return results

    before, midway, timeout, refused = asyncio.run(scenario())
    assert before == (httpx.RemoteProtocolError, "Server disconnected without sending a response.")
    assert midway == (
        httpx.RemoteProtocolError,
        "peer closed connection without sending complete message body",
    )
    assert timeout[0] is httpx.ReadTimeout
    assert refused[0] is httpx.ConnectError


@pytest.mark.parametrize("status", [204, 304])
def test_answers_without_a_body(status):
    async def scenario():
        async with Server([b"HTTP/1.1 %d X\r\n\r\n" % status], fixed(b"next")) as server, client() as c:
            first = await c.get(server.url + "/")
            second = await c.get(server.url + "/")
            return first.status_code, first.content, second.content, server.connections

    assert asyncio.run(scenario()) == (status, b"", b"next", 1)


@pytest.mark.parametrize(
    ("method", "content"), [("POST", b'{"model": "m"}'), ("POST", b""), ("GET", b""), ("DELETE", b"")]
)
def test_a_request_sent_without_an_httpx_request_is_the_same_on_the_wire(method, content):
    """LlamaTransport.send (the gateway's way, gateway/upstream.py) writes what an httpx.Request would."""
    headers = {"Authorization": "Bearer key", "Content-Type": "application/json"}

    async def scenario():
        async with Server(fixed(b"{}"), fixed(b"{}")) as server:
            transport = LlamaTransport()
            url = httpx.URL(server.url + "/v1/chat/completions")
            for response in (
                await transport.send(method, url, headers, content, {}),
                await transport.handle_async_request(
                    httpx.Request(method, url, headers=headers, content=content)
                ),
            ):
                assert response.status_code == 200 and await response.aread() == b"{}"
                await response.aclose()
            await transport.aclose()
            return server.requests

    lean, built = asyncio.run(scenario())

    def parts(raw: bytes):
        head, _, body = raw.partition(b"\r\n\r\n")
        first, *lines = head.split(b"\r\n")
        return first, sorted(line.lower() for line in lines), body

    assert parts(lean) == parts(built)
    assert parts(lean)[2] == content
