"""The one shared httpx.AsyncClient of this web worker (per event loop), on the gateway's own HTTP/1.1 transport
(http11.py), and the way to an instance."""

import asyncio

import httpx
from django.conf import settings

from .http11 import LlamaTransport

_clients: dict[tuple[int, bool], tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}

# llama-server (cpp-httplib) closes a connection idle for 5 s, and each open connection holds one of its few
# HTTP threads meanwhile. The pool forgets idle connections well before: a request never goes out on one the
# server is closing, and a closed one frees the server's thread.
KEEPALIVE_EXPIRY = 2.0

# Failures with nothing received from the server: a request on a kept-alive connection that the server closed
# (RemoteProtocolError "Server disconnected without sending a response", a reset, a broken pipe). Tried once
# more on a new connection (Exchange.send). Not connection refused or a timeout: a new connection fares no better.
RETRYABLE = (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError)


def timeout() -> httpx.Timeout:
    """Connect (and pool, write) short; a read may wait long — a long prompt can take minutes before its
    first token — but never past the overall cap, which the stream also checks between chunks."""
    short = float(settings.GATEWAY_CONNECT_TIMEOUT)
    return httpx.Timeout(
        connect=short, pool=short, write=short, read=float(settings.GATEWAY_MAX_REQUEST_SECONDS)
    )


def client() -> httpx.AsyncClient:
    """The worker's client: one connection pool for every instance. A client belongs to the event loop it
    was made on (a server has one loop per worker; tests start new ones)."""
    return _client(fresh=False)


def fresh_client() -> httpx.AsyncClient:
    """A client that keeps no connection: each request on a new one (the retry of a broken request)."""
    return _client(fresh=True)


def _client(fresh: bool) -> httpx.AsyncClient:
    loop = asyncio.get_running_loop()
    held = _clients.get((id(loop), fresh))
    if held is None or held[0] is not loop:
        # Per instance the gateway sends at most its slot count at once (slots.py): so many connections stay.
        transport = LlamaTransport(max_keepalive=0 if fresh else 64, keepalive_expiry=KEEPALIVE_EXPIRY)
        held = (loop, httpx.AsyncClient(timeout=timeout(), transport=transport, trust_env=False))
        _clients[(id(loop), fresh)] = held
        for key in [k for k, (other, _) in _clients.items() if other.is_closed()]:
            del _clients[key]
    return held[1]


def base_url(instance) -> str:
    """The instance on its host, as the host's worker reported it reachable (Host.address); fetch the
    instance with select_related("host") on hot paths."""
    return f"http://{instance.host.address or '127.0.0.1'}:{instance.port}"


def headers(instance) -> dict[str, str]:
    """The instance's own key: llama-server refuses everyone else."""
    return {"Authorization": f"Bearer {instance.api_key}", "Content-Type": "application/json"}
