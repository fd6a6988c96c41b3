"""Schemathesis, the OpenAPI fuzzer, over every operation of /api/schema/ as an admin, against the real app
in this process (WSGI: no server; the throwaway test database). Bounded and repeatable: a fixed seed,
derandomized, no example database.

Checks, each failing the test: `not_a_server_error` (no 5xx at all: the test broker is up, so not even
the documented 503s), `status_code_conformance` (every status answered is documented for the operation),
`content_type_conformance` and `response_schema_conformance` (the body is JSON and matches the schema
of its status).

Phases: coverage (each parameter's boundaries, wrong types, missing required fields: a fixed set per
operation) and fuzzing (EXAMPLES_PER_OPERATION random examples, valid and invalid). Each operation runs
with an API token; the users and tokens changes, which tokens may not make, run again with a session.
State-changing operations run too: they change only the test database; loads queue to the test broker,
where no worker consumes them, so nothing starts."""

import zlib
from datetime import timedelta

import pytest
import schemathesis
from django.conf import settings as django_settings
from django.contrib.auth.models import User
from django.core import signals
from django.core.wsgi import get_wsgi_application
from django.db import close_old_connections
from django.test import Client
from django.utils import timezone
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from accounts.models import ApiToken
from gpus.models import Gpu
from models_app.models import GpuInstance, ModelConfig
from policy.models import Pin, Quota, Reservation
from tests.api.factories import make_instance

SEED = 20251127
EXAMPLES_PER_OPERATION = 12
CSRF = "schemathesis0csrf0secret00000000"  # 32 characters: a CSRF secret in the cookie and the header

CONFIG = SchemathesisConfig.from_dict(
    {
        "seed": SEED,
        "generation": {
            "mode": "all",
            "max-examples": EXAMPLES_PER_OPERATION,
            "deterministic": True,
            "with-security-parameters": False,  # no made-up session cookies: the test signs in
        },
        # Coverage: each parameter's boundaries and wrong types, a fixed set per operation; fuzzing: random
        # examples. The examples phase has nothing to run (the schema carries no examples).
        "phases": {
            "examples": {"enabled": False},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
        },
    }
)
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]

# The gateway's routes (gateway/openapi.py) are async views that stream from llama-server: fuzzed in
# tests/gateway/test_fuzz_gateway.py, not here.
schema = schemathesis.openapi.from_wsgi("/api/schema/", get_wsgi_application(), config=CONFIG).exclude(
    tag_regex="^Gateway: "
)


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
    running = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    make_instance([fake_gpus.gpus[1]], tiny_model, owner=users["operator"], status="stopped")
    # the team policy's rows: a quota, a reservation, a pin
    Quota.objects.create(user=users["operator"], gpus=1)
    now = timezone.now()
    Reservation.objects.create(
        host=fake_gpus.host, gpu_indices=[1], start=now, end=now + timedelta(hours=1), purpose="x"
    )
    Pin.objects.create(instance=running, pinned_by=users["admin"])
    return users


# The rows an `{id}` may name, per collection. Random ids almost never exist, so most cases would only
# exercise the 404; two in three are moved onto a row that does.
EXISTING = {
    "/api/v1/users/": lambda: list(User.objects.values_list("pk", flat=True)),
    "/api/v1/instances/": lambda: list(GpuInstance.objects.values_list("pk", flat=True)),
    "/api/v1/gpus/": lambda: list(Gpu.objects.values_list("pk", flat=True)),
    "/api/v1/tokens/": lambda: list(ApiToken.objects.values_list("pk", flat=True)),
    "/api/v1/models/": lambda: list(ModelConfig.objects.values_list("pk", flat=True)),
    "/api/v1/quotas/": lambda: list(Quota.objects.values_list("pk", flat=True)),
    "/api/v1/reservations/": lambda: list(Reservation.objects.values_list("pk", flat=True)),
    "/api/v1/pins/": lambda: list(Pin.objects.values_list("pk", flat=True)),
}


def aim_at_existing_rows(case) -> None:
    for name in ("id", "gpu_pk"):
        if name not in (case.path_parameters or {}):
            continue
        collection = next((c for c in EXISTING if case.operation.path.startswith(c)), None)
        choice = zlib.crc32(str(case.path_parameters[name]).encode()) % 3
        if collection and choice:
            rows = EXISTING[collection]()
            if rows:
                case.path_parameters[name] = rows[choice % len(rows)]


@pytest.fixture
def admin_token(world):
    """`admin_token()` -> the Authorization header of a new admin token: a new one for every request, since
    a fuzzed DELETE /api/v1/tokens/{id}/ may revoke an earlier one."""

    def header() -> dict:
        _, raw = ApiToken.issue(world["admin"], "schemathesis")
        return {"Authorization": f"Bearer {raw}"}

    return header


@pytest.fixture
def admin_session(world):
    """`admin_session()` -> the headers and cookies of a new admin session with its CSRF token: a new one
    for every request, since a fuzzed password change ends the earlier ones."""

    def credentials() -> dict:
        client = Client()
        client.force_login(world["admin"])
        session = client.cookies[django_settings.SESSION_COOKIE_NAME].value
        cookies = {django_settings.SESSION_COOKIE_NAME: session, django_settings.CSRF_COOKIE_NAME: CSRF}
        return {"headers": {"X-CSRFToken": CSRF}, "cookies": cookies}

    return credentials


HYPOTHESIS = settings(
    max_examples=EXAMPLES_PER_OPERATION,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=list(HealthCheck),
)


@schema.parametrize()
@HYPOTHESIS
def test_every_operation_with_an_admin_token(case, admin_token):
    aim_at_existing_rows(case)
    case.call_and_validate(checks=CHECKS, headers=admin_token())


# Tokens may not change users or create tokens (403); these changes run again with a logged-in session.
@schema.include(
    path_regex=r"^/api/v1/(users|tokens)/", method=["POST", "PUT", "PATCH", "DELETE"]
).parametrize()
@HYPOTHESIS
def test_user_and_token_changes_with_an_admin_session(case, admin_session):
    aim_at_existing_rows(case)
    case.call_and_validate(checks=CHECKS, **admin_session())
