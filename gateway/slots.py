"""Bounded concurrency per instance: as many requests at once as llama-server has parallel slots, a bounded
queue of waiting ones behind them, and 429 beyond it. Per web worker and per event loop; nothing to clean up
after a crash (the counters live in this process only)."""

import asyncio
import collections

from django.conf import settings

from . import upstream
from .errors import GatewayError


class Gate:
    def __init__(self, slots: int):
        self.slots = max(1, slots)
        self.busy = 0
        self.waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def load(self) -> int:
        return self.busy + len(self.waiters)

    async def enter(self, queue_size: int) -> None:
        if self.busy < self.slots and not self.waiters:
            self.busy += 1
            return
        if len(self.waiters) >= queue_size:
            raise GatewayError(
                429,
                f"the model is busy: {self.busy} requests are being answered and {len(self.waiters)} wait; "
                "try again shortly",
                code="too_many_requests",
                retry_after=1,
            )
        waiter = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        try:
            await waiter
        except BaseException:
            if waiter in self.waiters:
                self.waiters.remove(waiter)
            elif waiter.done() and not waiter.cancelled():
                self.leave()  # a slot was handed over just as we gave up: pass it on
            raise

    def leave(self) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the next in line
                return
        self.busy = max(0, self.busy - 1)


# (loop id, instance id, pid) -> Gate: a restarted instance (another pid) gets a fresh gate.
_gates: dict[tuple, tuple[asyncio.AbstractEventLoop, Gate]] = {}


def configured_slots(cli_params: dict) -> int | None:
    for name in ("np", "-np", "parallel", "--parallel"):
        value = (cli_params or {}).get(name)
        if isinstance(value, int | str) and str(value).lstrip("-").isdigit() and int(value) > 0:
            return int(value)
    return None


async def discover_slots(instance) -> int:
    """llama-server's own count (/props total_slots: `-np` or its automatic choice), else the registry's
    flags, else 1."""
    try:
        url = upstream.base_url(instance) + "/props"
        response = await upstream.send(
            upstream.transport(), "GET", url, headers=upstream.headers(instance), stream=False, seconds=2.0
        )
        if response.status_code == 200:
            slots = int(response.json().get("total_slots") or 0)
            if slots > 0:
                return slots
    except Exception:  # an old build without /props, or a moment of trouble: fall back
        pass
    return configured_slots(instance.model.cli_params) or 1


async def gate_for(instance) -> Gate:
    loop = asyncio.get_running_loop()
    key = (id(loop), instance.pk, instance.pid)
    held = _gates.get(key)
    if held is None or held[0] is not loop:
        slots = await discover_slots(instance)
        held = _gates.get(key)  # another request may have discovered it meanwhile
        if held is None or held[0] is not loop:
            held = (loop, Gate(slots))
            _gates[key] = held
            for stale in [k for k, (other, _) in _gates.items() if other.is_closed()]:
                del _gates[stale]
    return held[1]


def queue_size() -> int:
    return settings.GATEWAY_QUEUE_SIZE


def local_load(instance) -> int:
    """The requests this web worker has on the instance (answered or waiting); 0 when it has none."""
    held = _gates.get((id(asyncio.get_running_loop()), instance.pk, instance.pid))
    return held[1].load if held is not None and held[0] is asyncio.get_running_loop() else 0
