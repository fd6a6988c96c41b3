"""The protocol of the gateway's inference routes (Ollama's generate, chat, embed, embeddings; OpenAI's chat
completions, completions, embeddings), written once: method, body, who asks, refusals in the route's dialect,
the keep-alive note, and the exchange finished exactly once. Each view keeps only what differs: its checks
of the body, its work, its shapes (views_ollama.py translates, views_openai.py passes through)."""

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from django.http import HttpRequest, HttpResponse, HttpResponseNotAllowed, StreamingHttpResponse

from . import access
from .db import db
from .errors import GatewayError, error_response, model_name_problem
from .exchange import Exchange, read_json
from .translate import BadRequest

KEEP_ALIVE_HEADER = "X-LlamaController-Keep-Alive"
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class Call:
    """An inference request whose body was accepted: what the route's answer works from."""

    request: HttpRequest
    exchange: Exchange
    raw: bytes  # the body as sent (OpenAI's routes pass it on byte for byte)
    body: dict
    checked: object  # what the route's check returned


async def serve(
    request,
    dialect: str,
    endpoint: str,
    answer: Callable[[Call], Awaitable[HttpResponse]],
    check: Callable[[dict], object] | None = None,
) -> HttpResponse:
    """One inference request, by the protocol every such route follows:

    - POST only (405 otherwise);
    - the body read (413 past the limit, 400 when not a JSON object), its model named (400), then
      `check(body)`, the route's own checks (a BadRequest is a 400). A body refused here asks who sent it
      first: a stranger gets the 401, a caller's refusal is recorded under their name;
    - `answer(call)`: the route's work; a GatewayError from it becomes the error in the route's `dialect`;
    - the exchange finished (upstream closed, slot freed, count ended, usage record written) when the
      answer is complete, or, for a stream handed over (`hand_over`), when the stream ends; a client that
      leaves first is noted (499 when it left before the answer began);
    - the keep-alive note on every answer (`noted`)."""
    if request.method != "POST":
        return HttpResponseNotAllowed(["POST"])
    exchange = Exchange(endpoint=endpoint)
    response = None
    try:
        try:
            raw, body = await read_json(request)
            problem = model_name_problem(body.get("model"))
            if problem is not None:
                raise problem
            checked = check(body) if check is not None else None
        except BadRequest as exc:
            await authenticate_only(request, exchange)
            raise GatewayError(400, str(exc)) from None
        except GatewayError:
            await authenticate_only(request, exchange)  # 401 comes before 400
            raise
        response = await answer(Call(request, exchange, raw, body, checked))
    except GatewayError as exc:
        exchange.status, exchange.error, exchange.throttled = exc.status, exc.message, exc.throttled
        response = error_response(dialect, exc)
    except asyncio.CancelledError:
        exchange.client_left()
        raise
    finally:
        # A streaming response comes only from hand_over: its stream finishes the exchange.
        if not isinstance(response, StreamingHttpResponse):
            await exchange.finish()
    return noted(exchange, response)


def hand_over(exchange: Exchange, chunks: AsyncIterator[bytes], content_type: str) -> StreamingHttpResponse:
    """The answer as a stream of `chunks`, passed on as they come. The exchange is the stream's from here:
    finished when it ends, breaks off or the client leaves, and even when it never starts (the client left
    between the view's return and the first byte: Exchange.guard)."""
    stream = _relay(exchange, chunks)
    exchange.guard(stream)
    response = StreamingHttpResponse(stream, content_type=content_type, headers=STREAM_HEADERS)
    response.relayed = stream  # gateway/handler.py sends these bytes as they are, without Django's wrappers
    response.upstream_complete = exchange.upstream_complete
    return response


async def _relay(exchange: Exchange, chunks: AsyncIterator[bytes]):
    try:
        async for chunk in chunks:
            yield chunk
    except (asyncio.CancelledError, GeneratorExit):
        exchange.disconnected = True
        raise
    finally:
        await exchange.finish()


def _authenticate(request):
    return access.authenticate(request)


async def authenticate_only(request, exchange: Exchange) -> None:
    """A body refused before the model is known: who asked decides between 401 and the refusal (and the
    usage record names them)."""
    caller = await db(_authenticate)(request)
    if caller.anonymous:
        raise GatewayError(
            401, "authentication required: send 'Authorization: Bearer <API token>'", code="unauthorized"
        )
    exchange.target = access.Target(caller=caller, model=None)


def noted(exchange: Exchange, response):
    """The response, with a header where the request's keep_alive was ignored: it would have shortened the
    idle timer of an instance the caller may not unload (models_app.keepalive.apply_keep_alive)."""
    if exchange.target is not None and exchange.target.keep_alive_ignored:
        response[KEEP_ALIVE_HEADER] = "ignored (you may not unload this model)"
    return response
