"""What the Ollama and OpenAI views share: listing, authenticating a request refused for its body."""

from . import access
from .db import db
from .exchange import Exchange


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
