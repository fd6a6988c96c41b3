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
  messages, htmx, axes (logins), WhiteNoise (static files).

`llamacontroller_site.asgi` sends the exact paths of `gateway.urls` here; everything else (the site, the
REST API under /api/v1/, the API docs) goes through the whole chain as before."""

from asgiref.sync import markcoroutinefunction, sync_to_async
from django.contrib.auth.middleware import AuthenticationMiddleware
from django.contrib.sessions.middleware import SessionMiddleware
from django.core.handlers.asgi import ASGIHandler
from django.core.handlers.exception import convert_exception_to_response
from django.middleware.clickjacking import XFrameOptionsMiddleware
from django.middleware.common import CommonMiddleware
from django.middleware.security import SecurityMiddleware
from django.urls import URLPattern

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
    Only then may the way out write (a modified session), so only then does it go through a thread."""

    async def respond(self, request, response):
        session = getattr(request, "session", None)
        if session is not None and (session.accessed or session.modified):
            return await sync_to_async(self.process_response)(request, response)
        return self.process_response(request, response)


# Outermost first, in the site's MIDDLEWARE order.
MIDDLEWARE = [
    (_Inline, SecurityMiddleware),
    (_Session, SessionMiddleware),
    (_Inline, CommonMiddleware),
    (_Inline, AuthenticationMiddleware),
    (_Inline, XFrameOptionsMiddleware),
]

PATHS = frozenset("/" + str(p.pattern) for p in urls.urlpatterns if isinstance(p, URLPattern))


class GatewayHandler(ASGIHandler):
    async def __call__(self, scope, receive, send):
        """Django's, less its ThreadSensitiveContext: that gives each request a thread of its own for its
        synchronous calls, started on the event loop at the first of them and joined through another new
        thread at the end — each thread start blocked the loop for about a millisecond on a busy two-core
        machine. The gateway's few synchronous calls here (the request signals' receivers, closing the
        response, saving a session that was read) are short and share asgiref's one thread instead; its
        database work runs on gateway/db.py's threads."""
        if scope["type"] != "http":
            raise ValueError(f"the gateway serves only HTTP, not {scope['type']}")
        await self.handle(scope, receive, send)

    def load_middleware(self, is_async=False):
        self._view_middleware = []
        self._template_response_middleware = []
        self._exception_middleware = []
        handler = convert_exception_to_response(self._get_response_async)
        for wrapper, middleware in reversed(MIDDLEWARE):
            handler = convert_exception_to_response(wrapper(handler, middleware))
        self._middleware_chain = handler
