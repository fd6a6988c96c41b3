"""Gateway view tests: real views and database, a stand-in llama-server behind httpx's MockTransport."""

import httpx
import pytest

from accounts.models import ApiToken
from gateway import slots, upstream
from models_app.models import GpuInstance
from tests.gateway.fakes import FakeLlamaServer
from tests.helpers import running_instance


@pytest.fixture(autouse=True)
def _close_gateway_connections():
    """The gateway's database threads keep their connections; close them after each test. Its caches (tokens,
    instances) start empty in each test: rows are rolled back between tests, ids come again."""
    from gateway import access, fairness

    access.clear_caches()
    fairness.reset()
    yield
    access.clear_caches()
    fairness.reset()
    from gateway.db import close_connections

    close_connections()


@pytest.fixture
def bearer(users):
    """`bearer(user)` -> the Authorization header value of a new token of that user."""

    def make(user):
        return f"Bearer {ApiToken.issue(user, 'test token')[1]}"

    return make


@pytest.fixture
def instance(fake_gpus, tiny_model):
    """A running instance of `tiny` (no process: the upstream is the fake below)."""
    row = running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[:1])
    GpuInstance.objects.filter(pk=row.pk).update(port=18999, api_key="instance-secret", pid=4242)
    row.refresh_from_db()
    return row


@pytest.fixture
def llama(monkeypatch):
    fake = FakeLlamaServer()
    monkeypatch.setattr(upstream, "transport", lambda: httpx.MockTransport(fake.handler))
    slots._gates.clear()
    yield fake
    slots._gates.clear()
