"""The gateway's routes under ASGI: Django's handler with only the middleware they need, each run on the
event loop.

Django runs a synchronous middleware method (each `process_request` and `process_response` of a
`MiddlewareMixin`) through a thread, one hop each way per middleware: with the site's chain that was about a
millisecond before every gateway request reached its view. The gateway's routes need little of that chain:

- security (HTTPS redirect and headers), common (e.g. Content-Length) and X-Frame-Options: pure header
  work, run inline;
- sessions and authentication, for callers without an API token: both only set up lazy objects on the way
  in (inline); the session is read on a gateway database thread when `access.authenticate` asks for the
  user, and saved on the way out through a thread, only where it was read;
- not needed: CSRF (the views are exempt; `access.authenticate` checks a session caller's writes itself),
  messages, htmx, axes (logins), WhiteNoise (static files);
- a request with an API token (the clients' traffic) skips sessions and authentication too
  (TOKEN_MIDDLEWARE).

`llamacontroller_site.asgi` sends the exact paths of `gateway.urls` here; everything else (the site, the
REST API under /api/v1/, the API docs) goes through the whole chain as before."""

import asyncio
import contextlib
from contextlib import aclosing

from asgiref.sync import markcoroutinefunction, sync_to_async
from django.conf import settings
from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.core.exceptions import RequestAborted
from django.core.handlers.asgi import ASGIHandler, get_script_prefix
from django.core.handlers.exception import convert_exception_to_response
from django.db import close_old_connections
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import URLPattern, set_script_prefix, set_urlconf
from django.utils.log import log_response

from . import urls


class _Inline:
    """A Django middleware whose methods do no I/O, called on the event loop."""

    sync_capable = False
    async_capable = True

    def __init__(self, get_response, middleware):
        self.get_response = get_response
        self.inner = middleware(get_response)
        self.process_request = getattr(self.inner, "process_request", None)
        self.process_response = getattr(self.inner, "process_response", None)
        markcoroutinefunction(self)

    async def __call__(self, request):
        response = self.process_request(request) if self.process_request else None
        response = response or await self.get_response(request)
        if self.process_response:
            response = await self.respond(request, response)
        return response

    async def respond(self, request, response):
        return self.process_response(request, response)


class _Session(_Inline):
    """The session store is lazy: nothing is read unless the view asks for the user (no API token sent).
    Only then may the way out write (a modified session), so only then does it go through a thread, which
    looks after its database connection as the request signals would (GatewayHandler sends none)."""

    async def respond(self, request, response):
        session = getattr(request, "session", None)
        if session is not None and (session.accessed or session.modified):
            return await sync_to_async(self._save)(request, response)
        return self.process_response(request, response)

    def _save(self, request, response):
        close_old_connections()
        try:
            return self.process_response(request, response)
        finally:
            close_old_connections()


# Outermost first, in the site's MIDDLEWARE order.
MIDDLEWARE = [
    (_Inline, SecurityMiddleware),
    (_Session, SessionMiddleware),
    (_Inline, CommonMiddleware),
    (_Inline, AuthenticationMiddleware),
    (_Inline, XFrameOptionsMiddleware),
]

# A request with an API token (an Authorization header) is the token's caller: `access.authenticate` reads the
# token and never the session or request.user (a request without `user` is anonymous there). So such requests,
# the clients' traffic, skip the session and authentication middleware; the header work stays the same.
TOKEN_MIDDLEWARE = [
    entry for entry in MIDDLEWARE if entry[1] not in (SessionMiddleware, AuthenticationMiddleware)
]

PATHS = frozenset("/" + str(p.pattern) for p in urls.urlpatterns if isinstance(p, URLPattern))


def _close(response) -> None:
    """HttpResponse.close() without the request_finished signal (see GatewayHandler)."""
    for closer in response._resource_closers:
        with contextlib.suppress(Exception):  # as Django's close: one failing closer does not stop the rest
            closer()
    response._resource_closers.clear()
    response.closed = True


class GatewayHandler(ASGIHandler):
    """Django's ASGI handler (5.2) with three thread hops fewer per request:

    - no ThreadSensitiveContext: that gives each request a thread of its own for its synchronous calls,
      started on the event loop at the first of them and joined through another new thread at the end —
      each thread start blocked the loop for about a millisecond on a busy two-core machine;
    - no request_started and request_finished signals: their receivers (Django's own: reset_queries,
      close_old_connections, close_caches, reset_urlconf) look after the calling thread's database
      connections and caches, and the event loop has none (the gateway's database work runs on
      gateway/db.py's threads, which keep theirs in order themselves; a session is saved through a thread
      that does the same). Sent on the event loop, as before, the two were ~15 % of the loop's Python work
      per request, for nothing;
    - the response closed on the event loop (`_close`: its resources, without the signal): the gateway's
      responses are JSON or an async stream, nothing to close in a thread.

    Under load those hops were the largest part of the time before the view ran: a thread must be woken on
    cores that llama-server keeps busy. `handle` follows Django's line by line otherwise."""

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            raise ValueError(f"the gateway serves only HTTP, not {scope['type']}")
        await self.handle(scope, receive, send)

    async def handle(self, scope, receive, send):
        try:
            body_file = await self.read_body(receive)
        except RequestAborted:
            return
        set_script_prefix(get_script_prefix(scope))
        request, error_response = self.create_request(scope, body_file)
        if request is None:
            body_file.close()
            await self.send_response(error_response, send)
            _close(error_response)
            return

        chain = (
            self._token_chain
            if request.META.get("HTTP_AUTHORIZATION", "").strip()
            else self._middleware_chain
        )

        async def process_request(request, send):
            response = await self.run_get_response(request, chain)
            with contextlib.suppress(asyncio.CancelledError):  # the client left during send_response
                await self.send_response(response, send)
            return response

        # The view races the client's disconnect (Django's order: the listener first).
        tasks = [
            asyncio.create_task(self.listen_for_disconnect(receive)),
            asyncio.create_task(process_request(request, send)),
        ]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in tasks:
            if task.done():
                try:
                    task.result()
                except RequestAborted:
                    pass
                except AssertionError:
                    body_file.close()
                    raise
            else:
                task.cancel()  # lets the view handle its cancellation
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        with contextlib.suppress(asyncio.CancelledError):
            _close(tasks[1].result())
        body_file.close()

    async def run_get_response(self, request, chain):
        """Django's get_response_async with the chain chosen for the request (and without the FileResponse
        tweak of ASGIHandler.run_get_response: the gateway sends no files)."""
        set_urlconf(settings.ROOT_URLCONF)
        response = await chain(request)
        response._resource_closers.append(request.close)
        if response.status_code >= 400:
            await sync_to_async(log_response, thread_sensitive=False)(
                "%s: %s", response.reason_phrase, request.path, response=response, request=request
            )
        return response

    async def send_response(self, response, send):
        """Django's, but a stream handed over by protocol.hand_over (its chunks in `relayed`: bytes, passed
        on by none of the MIDDLEWARE above) goes out as it comes: Django's way wraps every chunk in two more
        generators, a bytes check and a slicing generator, which cost the worker more than the chunk's write.
        Once the instance's answer is complete (`upstream_complete`), the rest waits for the stream's end and
        goes with it: one write to the client where there were two, each a wake-up of its reader."""
        chunks = getattr(response, "relayed", None)
        if chunks is None:
            return await super().send_response(response, send)
        headers = [(name.encode("ascii"), value.encode("latin1")) for name, value in response.items()]
        headers += [
            (b"Set-Cookie", c.output(header="").encode("ascii").strip()) for c in response.cookies.values()
        ]
        await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
        upstream_complete = getattr(response, "upstream_complete", None)
        sent, tail = False, b""
        async with aclosing(chunks):
            async for chunk in chunks:
                if sent and upstream_complete is not None and upstream_complete():
                    # The instance's answer is all here: the rest goes out with the stream's end in one write
                    # (the end waits for the usage record either way). Never the first chunk: it may not wait.
                    tail += chunk
                    continue
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
                sent = True
        await send({"type": "http.response.body", "body": tail})

    def resolve_request(self, request):
        """Django's, once per path: the gateway's paths are exact (PATHS) and each resolves to one view
        without arguments, so the match is kept (Django walks the site's URL patterns for it: ~17 us)."""
        match = None if hasattr(request, "urlconf") else self._matches.get(request.path_info)
        if match is None:
            match = super().resolve_request(request)
            if request.path_info in PATHS and not hasattr(request, "urlconf"):
                self._matches[request.path_info] = match
        request.resolver_match = match
        return match

    def load_middleware(self, is_async=False):
        self._matches = {}
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        self._middleware_chain = self._chain(MIDDLEWARE)
        self._token_chain = self._chain(TOKEN_MIDDLEWARE)

    def _chain(self, middleware):
        handler = convert_exception_to_response(self._get_response_async)
        for wrapper, each in reversed(middleware):
            handler = convert_exception_to_response(wrapper(handler, each))
        return handler
