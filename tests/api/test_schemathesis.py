"""Schemathesis, the OpenAPI fuzzer, over every operation of /api/schema/ with an admin token, against the
real app in this process (WSGI: no server, the test database). Bounded and repeatable: a fixed seed,
derandomized, a few examples per operation.

Checks: `not_a_server_error` (no 5xx, except the 503 that /api/v1/health/ documents when the broker is
down), `status_code_conformance` (every status answered is in the schema), `content_type_conformance`
and `response_schema_conformance` (the body matches the schema of its status).

Generated data is mostly valid ("positive" mode) with some invalid ("negative" mode: wrong types, out of
range, missing fields), so refusals (400) are exercised as well as successes. State-changing operations run
too: they change only the throwaway test database; loads queue to the test broker, where no worker
consumes them."""

import time

import pytest
import schemathesis
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from accounts.models import ApiToken
from tests.api.factories import make_instance

SEED = 20251127
EXAMPLES_PER_OPERATION = 12

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": SEED,
        "generation": {"mode": "all", "max-examples": EXAMPLES_PER_OPERATION, "deterministic": True},
        # The coverage phase's boundary cases are not bounded by max-examples; the examples phase has
        # nothing to do (the schema carries no examples). Fuzzing alone keeps the run short.
        "phases": {"examples": {"enabled": False}, "coverage": {"enabled": False}},
    }
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application(), config=CONFIG)


@pytest.fixture
def wsgi_in_test_transaction():
    """As Django's test client does: a request through the WSGI handler must not close the test's database
    connection (it would end the test's transaction)."""
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@pytest.fixture
def world(users, fake_gpus, tiny_model, wsgi_in_test_transaction):
    """Something for the GETs to find: two GPUs, a model, a running and a stopped instance, their events."""
    make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    make_instance([fake_gpus.gpus[1]], tiny_model, owner=users["operator"], status="stopped")
    return users


@schema.parametrize()
@settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)
def test_api_answers_every_request_by_its_schema(case, world):
    # A fresh token for each request: a fuzzed DELETE /api/v1/tokens/{id}/ may revoke an earlier one.
    _, raw = ApiToken.issue(world["admin"], "schemathesis")
    started = time.monotonic()
    case.call_and_validate(headers={"Authorization": f"Bearer {raw}"}, checks=CHECKS)
    assert time.monotonic() - started < 10, f"{case.method} {case.formatted_path} took too long"
