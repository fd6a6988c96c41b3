"""The way to an instance: this web worker's connections to llama-server (one pool per event loop) on the
gateway's own HTTP/1.1 transport (http11.py), and the requests sent on them."""

import asyncio

import httpx
from django.conf import settings

from .http11 import LlamaTransport

_transports: dict[tuple[int, bool], tuple[asyncio.AbstractEventLoop, httpx.AsyncBaseTransport]] = {}

# llama-server (cpp-httplib) closes a connection idle for 5 s, and each open connection holds one of its few
# HTTP threads meanwhile. The pool forgets idle connections well before: a request never goes out on one the
# server is closing, and a closed one frees the server's thread.
KEEPALIVE_EXPIRY = 2.0

# Failures with nothing received from the server: a request on a kept-alive connection that the server closed
# (RemoteProtocolError "Server disconnected without sending a response", a reset, a broken pipe). Tried once
# more on a new connection (Exchange.send). Not connection refused or a timeout: a new connection fares no better.
RETRYABLE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def timeout(seconds: float | None = None) -> dict:
    """Connect (and pool, write) short; a read may wait long — a long prompt can take minutes before its
    first token — but never past the overall cap, which the stream also checks between chunks. `seconds`:
    one limit for all four instead."""
    if seconds is not None:
        return dict.fromkeys(("connect", "read", "write", "pool"), seconds)
    short = float(settings.GATEWAY_CONNECT_TIMEOUT)
    return {
        "connect": short,
        "read": float(settings.GATEWAY_MAX_REQUEST_SECONDS),
        "write": short,
        "pool": short,
    }


def transport() -> httpx.AsyncBaseTransport:
    """The worker's connection pool for every instance. It belongs to the event loop it was made on (a server
    has one loop per worker; tests start new ones)."""
    return _transport(fresh=False)


def fresh_transport() -> httpx.AsyncBaseTransport:
    """One that keeps no connection: each request on a new one (the retry of a broken request)."""
    return _transport(fresh=True)


def _transport(fresh: bool) -> httpx.AsyncBaseTransport:
    loop = asyncio.get_running_loop()
    held = _transports.get((id(loop), fresh))
    if held is None or held[0] is not loop:
        # Per instance the gateway sends at most its slot count at once (slots.py): so many connections stay.
        held = (loop, LlamaTransport(max_keepalive=0 if fresh else 64, keepalive_expiry=KEEPALIVE_EXPIRY))
        _transports[(id(loop), fresh)] = held
        for key in [k for k, (other, _) in _transports.items() if other.is_closed()]:
            del _transports[key]
    return held[1]


async def send(
    pool: httpx.AsyncBaseTransport, method: str, url: str, *, headers: dict, content: bytes = b"",
    stream: bool, seconds: float | None = None,
) -> httpx.Response:  # fmt: skip
    """`method url` on the transport `pool`: an httpx request and response, without httpx's client, whose
    cookies, redirects, authentication, hooks and log line per request were a tenth of a streamed request's
    fixed CPU and nothing the gateway uses. With `stream` the caller reads the body and closes the response;
    without, the body is read here. Timeouts: timeout(seconds). httpx's exceptions as its client raises them."""
    if isinstance(pool, LlamaTransport):
        response = await pool.send(method, _url(url), headers, content, timeout(seconds))
    else:  # another transport (the tests' MockTransport): through an httpx.Request
        request = httpx.Request(
            method, _url(url), content=content, headers=headers, extensions={"timeout": timeout(seconds)}
        )
        response = await pool.handle_async_request(request)
        response.request = request
    if not stream:
        try:
            await response.aread()
        finally:
            await response.aclose()
    return response


_urls: dict[str, httpx.URL] = {}


def _url(url: str) -> httpx.URL:
    """The URL parsed once: httpx's parsing was two thirds of building each request (38 against 12 us)."""
    parsed = _urls.get(url)
    if parsed is None:
        if len(_urls) >= 1024:  # instances come and go (ports change): start again rather than grow
            _urls.clear()
        parsed = _urls[url] = httpx.URL(url)
    return parsed


def base_url(instance) -> str:
    """The instance on its host, as the host's worker reported it reachable (Host.address); fetch the
    instance with select_related("host") on hot paths."""
    return f"http://{instance.host.address or '127.0.0.1'}:{instance.port}"


def headers(instance) -> dict[str, str]:
    """The instance's own key: llama-server refuses everyone else."""
    return {"Authorization": f"Bearer {instance.api_key}", "Content-Type": "application/json"}
