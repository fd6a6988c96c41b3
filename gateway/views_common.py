"""What the Ollama and OpenAI views share: listing, authenticating a request refused for its body, the note
on an ignored keep_alive."""

from . import access
from .db import db
from .exchange import Exchange

KEEP_ALIVE_HEADER = "X-LlamaController-Keep-Alive"


def _list(request):
    caller = access.authenticate(request)
    return caller, list(access.listable_models(caller))


async def list_models(request):
    return (await db(_list)(request))[1]


def _authenticate(request):
    return access.authenticate(request)


async def authenticate_only(request, exchange: Exchange) -> None:
    """A body refused before the model is known: who asked decides between 401 and the refusal (and the
    usage record names them)."""
    caller = await db(_authenticate)(request)
    if caller.anonymous:
        raise access.GatewayError(
            401, "authentication required: send 'Authorization: Bearer <API token>'", code="unauthorized"
        )
    exchange.target = access.Target(caller=caller, model=None)


def noted(exchange: Exchange, response):
    """The response, with a header where the request's keep_alive was ignored: it would have shortened the
    idle timer of an instance the caller may not unload (models_app.ondemand.apply_keep_alive)."""
    if exchange.target is not None and exchange.target.keep_alive_ignored:
        response[KEEP_ALIVE_HEADER] = "ignored (you may not unload this model)"
    return response
