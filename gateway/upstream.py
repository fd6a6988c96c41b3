"""The one shared httpx.AsyncClient of this web worker (per event loop) and the way to an instance."""

import asyncio

import httpx
from django.conf import settings

_clients: dict[int, tuple[asyncio.AbstractEventLoop, httpx.AsyncClient]] = {}


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
    loop = asyncio.get_running_loop()
    held = _clients.get(id(loop))
    if held is None or held[0] is not loop:
        limits = httpx.Limits(max_connections=None, max_keepalive_connections=64, keepalive_expiry=30)
        held = (loop, httpx.AsyncClient(timeout=timeout(), limits=limits, trust_env=False))
        _clients[id(loop)] = held
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
