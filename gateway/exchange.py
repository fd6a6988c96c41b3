"""One inference request's way through the gateway: body, caller, instance, slot, upstream response, and
the usage record written once at its end — whether it was answered, refused, failed or abandoned."""

import asyncio
import contextlib
import json
import logging
import time
import weakref
from dataclasses import dataclass, field
from datetime import datetime

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.utils import timezone

from . import access, fairness, slots, upstream, usage
from .db import db
from .errors import GatewayError
from .model_facts import model_id_of
from .translate import keep_alive_seconds

logger = logging.getLogger(__name__)

# Cleanups scheduled for exchanges whose stream was never started: kept so they are not garbage-collected.
_pending_cleanups: set[asyncio.Task] = set()


async def read_json(request) -> tuple[bytes, dict]:
    """The body, raw and as a JSON object: 413 past the size limit, 400 when it is not a JSON object."""
    declared = request.META.get("CONTENT_LENGTH")  # request.headers' Content-Length, without building it
    limit = settings.GATEWAY_MAX_BODY_BYTES
    if declared and declared.isdigit() and int(declared) > limit:
        raise GatewayError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    raw = request.read(limit + 1)
    if len(raw) > limit:
        raise GatewayError(413, f"the request body is larger than {limit} bytes", code="body_too_large")
    try:
        body = json.loads(raw or b"")
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GatewayError(400, f"the request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise GatewayError(400, "the request body must be a JSON object", code="invalid_json")
    return raw, body


@dataclass
class Exchange:
    endpoint: str
    model_name: str = ""
    started: float = field(default_factory=time.perf_counter)
    created_at: datetime = field(default_factory=timezone.now)
    target: access.Target | None = None
    instance: object = None
    keep_alive: int | None = None
    counted: bool = False  # request_started was called: request_finished must follow
    counting: asyncio.Future | None = None  # the way in's database call that may count the request
    gate: slots.Gate | None = None
    response: httpx.Response | None = None
    status: int = 200
    error: str = ""
    throttled: str = ""  # why fair use held the request back (a GatewayError's `throttled`), if it did
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    first_token_at: float | None = None
    load_seconds: float = 0.0
    disconnected: bool = False
    finished: bool = False

    # --- the way in -----------------------------------------------------------------------------------

    async def begin(self, request, body: dict) -> None:
        """Caller, model, running instance (loading or waiting for one if needed), slot."""
        name = body.get("model")
        self.model_name = name if isinstance(name, str) else ""
        try:
            self.keep_alive = keep_alive_seconds(body.get("keep_alive"))
        except ValueError as exc:
            raise GatewayError(400, str(exc)) from None
        # The usual case, a token and a model seen moments ago: the caller, the model and its instance come
        # from the caches (access.py) without leaving the event loop, and one database call counts the
        # request on the instance, which also checks the cached instance against its row. (Run while the
        # request went upstream instead, that call took CPU from llama-server's prompt on a two-core
        # machine, and cost more than it hid.)
        caller = access.cached_caller(request)
        model_id = model_id_of(name.strip()) if isinstance(name, str) else ""
        instances = access.cached_instances(model_id) if caller is not None and model_id else None
        if instances:
            self.target = access.Target(caller=caller, model=None)
            self.target.model = access.find_model(caller, name, known=instances[0].model)
            instances.sort(key=slots.local_load)  # the least busy here first (the cache's order is older)
            await self._counting(self._start, model_id, instances, True)
        else:
            await self._counting(self._resolve, request, name)
        fairness.admit(self.user)
        await self.acquire()

    async def _counting(self, function, *args) -> None:
        """`function` on a database thread, where it may count the request (and says so on self). Shielded:
        a client that leaves meanwhile does not stop it, and finish() waits for it, so that a count made is
        always ended."""
        self.counting = db(function)(*args)
        await asyncio.shield(self.counting)

    def _resolve(self, request, name) -> None:
        """One hop before the first byte: who asks (known before the model, so a refusal for the model is
        recorded), the model, and where a running instance exists, the request counted on it."""
        caller = access.authenticate(request)
        self.target = access.Target(caller=caller, model=None)
        model_id = model_id_of(name.strip()) if isinstance(name, str) else ""
        instances, cached = access.running_instances(model_id) if model_id else ([], False)
        known = instances[0].model if instances else None
        self.target.model = access.find_model(caller, name, known=known)
        self._start(model_id, instances, cached)

    def _start(self, model_id: str, instances: list, cached: bool) -> None:
        instance = access.start_request(self.target, model_id, instances, cached, self.keep_alive)
        if instance is not None:
            self.instance, self.counted = instance, True

    def _count(self, instance) -> None:
        if access.request_started(self.target, instance, self.keep_alive):
            self.instance, self.counted = instance, True

    async def acquire(self) -> None:
        """Without a running instance: load on demand (or wait for the load under way) in a worker thread,
        then count the request on it. Then a slot of the instance, waiting in its queue if need be."""
        while not self.counted:
            loading = time.perf_counter()
            instance = await sync_to_async(access.ensure_running, thread_sensitive=False)(self.target)
            self.load_seconds += time.perf_counter() - loading
            await self._counting(self._count, instance)
            # not counted: it stopped meanwhile (an idle unload won the race): look again
        await self.enter_gate()

    async def enter_gate(self) -> None:
        gate = await slots.gate_for(self.instance)
        await gate.enter(slots.queue_size(), self.user, slots.max_queue_seconds())
        self.gate = gate

    @property
    def user(self) -> str:
        """Whom fair use counts this request for (its queue in the gate, its rate limits)."""
        return fairness.user_key(self.target.caller if self.target is not None else None)

    def deadline(self) -> float:
        return self.started + settings.GATEWAY_MAX_REQUEST_SECONDS

    async def send(self, path: str, payload: bytes, *, stream: bool) -> httpx.Response:
        """POST to the instance; with `stream` the body is read by the caller (and closed by finish()).
        A connection that broke before any answer is tried once more, on a new connection: nothing has
        reached the client yet. (llama-server closes a connection idle for 5 s; a request sent on it just
        then fails with "Server disconnected without sending a response".)"""
        try:
            try:
                self.response = await self._post(upstream.transport(), path, payload, stream)
            except upstream.RETRYABLE as exc:
                logger.info(
                    "instance %s: %r before any answer; once more on a new connection", self.instance.pk, exc
                )
                self.response = await self._post(upstream.fresh_transport(), path, payload, stream)
        except TimeoutError:
            raise GatewayError(
                504, f"no answer within {settings.GATEWAY_MAX_REQUEST_SECONDS}s", code="timeout"
            ) from None
        except httpx.TimeoutException as exc:
            raise GatewayError(
                504, f"the model's server did not answer in time ({exc.__class__.__name__})"
            ) from None
        except httpx.HTTPError as exc:
            access.forget_instances(self.instance.model_id)  # the next request reads the database
            raise GatewayError(
                502, f"the model's server could not be reached: {exc}", code="upstream_error"
            ) from None
        return self.response

    async def _post(
        self, transport: httpx.AsyncBaseTransport, path: str, payload: bytes, stream: bool
    ) -> httpx.Response:
        url, headers = upstream.base_url(self.instance) + path, upstream.headers(self.instance)
        if stream:
            return await upstream.send(transport, "POST", url, headers=headers, content=payload, stream=True)
        async with asyncio.timeout(max(0.001, self.deadline() - time.perf_counter())):
            return await upstream.send(transport, "POST", url, headers=headers, content=payload, stream=False)

    def upstream_complete(self) -> bool:
        """The instance's whole answer has arrived (gateway/http11.py says so before it hands on the last
        piece): whatever the answer's stream still yields comes without waiting for the instance."""
        return getattr(getattr(self.response, "stream", None), "complete", False) is True

    def client_left(self) -> None:
        """The client disconnected before the answer began (499, as nginx logs it) or during it."""
        self.disconnected = True
        if self.response is None:
            self.status = 499

    def mark_first_token(self) -> None:
        if self.first_token_at is None:
            self.first_token_at = time.perf_counter()

    # --- the way out ----------------------------------------------------------------------------------

    async def finish(self) -> None:
        """Close the upstream response, free the slot, end the in-flight count and write the usage record.
        Once; safe to call from a cancelled task (the database write is shielded)."""
        if self.finished:
            return
        self.finished = True
        if self.response is not None:
            # Closing a broken connection may fail: there is nothing more to do then.
            with contextlib.suppress(Exception):
                await self.response.aclose()
        if self.gate is not None:
            self.gate.leave()
            self.gate = None
        fairness.spend(self.user, (self.prompt_tokens or 0) + (self.completion_tokens or 0))
        with contextlib.suppress(GatewayError):  # logged by _log_failure
            if self.counting is None or self.counting.done():
                await asyncio.shield(self._written())  # the usual case: a future, shielded without a task
            else:
                await asyncio.shield(self._complete())

    async def _complete(self) -> None:
        """A count under way when the client left: its outcome first (a count made is always ended)."""
        with contextlib.suppress(Exception):
            await self.counting
        await self._written()

    def _written(self) -> asyncio.Future:
        written = db(self._write)()
        written.add_done_callback(self._log_failure)
        return written

    def _log_failure(self, written: asyncio.Future) -> None:
        exc = None if written.cancelled() else written.exception()
        if isinstance(exc, GatewayError):  # the answer is given: a record the database refused is only logged
            logger.error("could not write the usage record of a %s request: %s", self.endpoint, exc.message)

    def _write(self) -> None:
        try:
            if self.counted:
                access.request_finished(self.instance.pk)
        except Exception:
            logger.exception("could not end the in-flight count of instance %s", self.instance.pk)
        if self.target is None or self.status == 401:
            return  # refused before we knew who asked: no record (strangers do not fill the table)
        now = time.perf_counter()
        caller = self.target.caller
        usage.record(
            user_id=caller.user_id,
            token_id=caller.token.pk if caller.token is not None else None,
            model_id=model_id_of(self.model_name)[:200],
            instance_id=getattr(self.instance, "pk", None),
            endpoint=self.endpoint,
            status=self.status,
            error=self.error[:2000],
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            time_to_first_token_ms=(
                round((self.first_token_at - self.started) * 1000, 3) if self.first_token_at else None
            ),
            duration_ms=round((now - self.started) * 1000, 3),
            client_disconnected=self.disconnected,
            throttled=self.throttled,
            created_at=self.created_at,
        )

    def guard(self, iterator) -> None:
        """If the response's iterator is dropped without ever running (the client left between the view's
        return and the first byte), finish anyway."""
        loop = asyncio.get_running_loop()
        exchange = self  # held by the finalizer, not by a cycle: it goes when the iterator goes

        def cleanup():
            if exchange.finished or loop.is_closed():
                return
            exchange.disconnected = True

            def schedule():
                task = loop.create_task(exchange.finish())
                _pending_cleanups.add(task)
                task.add_done_callback(_pending_cleanups.discard)

            loop.call_soon_threadsafe(schedule)

        weakref.finalize(iterator, cleanup)
