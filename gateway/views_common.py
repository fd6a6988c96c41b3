"""What the Ollama and OpenAI listings share: who asks, and the models they may see. (The inference routes'
shared protocol is protocol.py.)"""

from . import access
from .db import db


def _list(request):
    caller = access.authenticate(request)
    return caller, list(access.listable_models(caller))


async def list_models(request):
    return (await db(_list)(request))[1]
