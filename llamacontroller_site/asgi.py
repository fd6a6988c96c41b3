"""The ASGI application (gunicorn with uvicorn workers, web_worker.py; see runner.py). Django's async views
stream the gateway's answers without holding a thread per stream; the sync views run as before.

Django reads a request's whole body before any view runs, so the gateway's body limit is enforced here,
while the body arrives: a larger one answers 413 without being stored."""

import gc
import json
import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llamacontroller_site.settings")
django_application = get_asgi_application()

from django.conf import settings  # noqa: E402  (after setup)

from gateway.handler import PATHS, GatewayHandler  # noqa: E402

# The gateway's own routes go through a shorter middleware chain run on the event loop (gateway/handler.py).
gateway_application = GatewayHandler()

# What is loaded by now (Django, the apps, their modules: ~113,000 objects the collector tracks) lives as long
# as the worker: out of the cyclic garbage collector's way. Its full collections otherwise walked all of it
# (~50 ms of CPU each, in which no stream moved), about one every 1,500 gateway requests: 0.14 ms a request on
# average with the younger generations' (measured with gc.callbacks on the gateway's code path), 0.02 ms with
# the freeze. Garbage first, so that none is kept for good.
gc.collect()
gc.freeze()

GATEWAY_PREFIXES = ("/api/", "/v1/")


def _too_large_body(path: str, limit: int) -> bytes:
    message = f"the request body is larger than {limit} bytes"
    if path.startswith("/v1/"):
        error = {"message": message, "type": "invalid_request_error", "code": "body_too_large"}
        return json.dumps({"error": error}).encode()
    return json.dumps({"error": message}).encode()


async def _refuse(send, path: str, limit: int) -> None:
    body = _too_large_body(path, limit)
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": 413, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def application(scope, receive, send):
    path = scope.get("path", "") if scope["type"] == "http" else ""
    if not path.startswith(GATEWAY_PREFIXES) or path.startswith("/api/v1/"):
        return await django_application(scope, receive, send)
    limit = settings.GATEWAY_MAX_BODY_BYTES
    length = dict(scope.get("headers") or []).get(b"content-length", b"")
    if length.isdigit() and int(length) > limit:
        return await _refuse(send, path, limit)
    received = 0
    refused = False

    async def counting_receive():
        nonlocal received, refused
        if refused:
            return {"type": "http.disconnect"}
        message = await receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > limit:
                refused = True
                await _refuse(send, path, limit)
                return {"type": "http.disconnect"}  # Django stops reading and answers nothing more
        return message

    handler = gateway_application if path in PATHS else django_application
    return await handler(scope, counting_receive, send)
