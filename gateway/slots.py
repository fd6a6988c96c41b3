"""Bounded concurrency per instance: as many requests at once as llama-server has parallel slots, a bounded
queue of waiting ones behind them (429 beyond it), served round-robin per user, each waiting at most
LLAMACONTROLLER_GATEWAY_MAX_QUEUE_SECONDS (503 past it). Per web worker and per event loop; nothing to clean
up after a crash (the counters live in this process only)."""

import asyncio
import collections
import itertools

from django.conf import settings

from . import upstream
from .errors import GatewayError

# A gate remembers when each user was last handed a slot; past this many users it forgets the idle ones.
_REMEMBERED_USERS = 1000


class Gate:
    """Slots and one FIFO per user. A freed slot goes to the waiting user who was served least recently (one
    never served first; between equals, the one who queued first), so a user with 100 requests waiting does
    not starve another's one: users take turns, each in their own order."""

    def __init__(self, slots: int):
        self.slots = max(1, slots)
        self.busy = 0
        self.queues: dict[str, collections.deque[asyncio.Future]] = {}  # users in the order they queued
        self.waiting = 0
        self.last_served: dict[str, int] = {}
        self._turn = itertools.count()

    @property
    def load(self) -> int:
        return self.busy + self.waiting

    async def enter(self, queue_size: int, user: str = "", max_wait: float = 0) -> None:
        """A slot for `user`, at once or after waiting in their queue: 429 when `queue_size` requests already
        wait, 503 after `max_wait` seconds (0: no limit)."""
        if self.busy < self.slots and not self.waiting:
            self.busy += 1
            self._served(user)
            return
        if self.waiting >= queue_size:
            raise GatewayError(
                429,
                f"the model is busy: {self.busy} requests are being answered and {self.waiting} wait; "
                "try again shortly",
                code="too_many_requests",
                retry_after=1,
                throttled="queue_full",
            )
        waiter = asyncio.get_running_loop().create_future()
        self.queues.setdefault(user, collections.deque()).append(waiter)
        self.waiting += 1
        try:
            async with asyncio.timeout(max_wait or None):
                await waiter
        except TimeoutError:
            if waiter.done() and not waiter.cancelled():
                return  # the slot came just as the time ran out: take it
            self._withdraw(user, waiter)
            raise GatewayError(
                503,
                f"the model stayed busy: no slot came free within {max_wait:g}s; try again shortly",
                code="queue_timeout",
                retry_after=5,
                throttled="queue_timeout",
            ) from None
        except BaseException:
            if not self._withdraw(user, waiter) and waiter.done() and not waiter.cancelled():
                self.leave()  # a slot was handed over just as we gave up: pass it on
            raise

    def leave(self) -> None:
        """A slot is free: to the next user in turn, or back to the pool when nobody waits."""
        while self.queues:
            user = min(self.queues, key=lambda name: self.last_served.get(name, -1))
            queue = self.queues[user]
            waiter = queue.popleft()
            self.waiting -= 1
            if not queue:
                del self.queues[user]
            if not waiter.done():
                waiter.set_result(None)  # the slot passes to the next in line
                self._served(user)
                return
        self.busy = max(0, self.busy - 1)

    def _withdraw(self, user: str, waiter: asyncio.Future) -> bool:
        """Take a waiter that gave up out of its queue; False when it was no longer there."""
        queue = self.queues.get(user)
        if queue is None or waiter not in queue:
            return False
        queue.remove(waiter)
        self.waiting -= 1
        if not queue:
            del self.queues[user]
        return True

    def _served(self, user: str) -> None:
        self.last_served[user] = next(self._turn)
        if len(self.last_served) > _REMEMBERED_USERS:
            self.last_served = {name: turn for name, turn in self.last_served.items() if name in self.queues}


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


def max_queue_seconds() -> float:
    return settings.GATEWAY_MAX_QUEUE_SECONDS


def local_load(instance) -> int:
    """The requests this web worker has on the instance (answered or waiting); 0 when it has none."""
    held = _gates.get((id(asyncio.get_running_loop()), instance.pk, instance.pid))
    return held[1].load if held is not None and held[0] is asyncio.get_running_loop() else 0
