"""The web pages' forms and filters never answer 5xx nor log a traceback, whatever a visitor sends (issue 17
item 6): hypothesis, seeded and bounded, over load, unload, switch, the load estimate, the events filters,
login, password change, token creation and revocation, the usage and history pages and alert acknowledgement,
for an anonymous visitor, a viewer, an operator and an admin (only an admin reaches the events page).

Values include NUL characters (a 500 on PostgreSQL before llamacontroller_site.input_guard), other scripts'
digits, raw bytes that are not UTF-8 in query strings, huge numbers and ids of rows that exist, that stopped
and that do not. Loads and unloads are requested for real; they queue nothing (the test's transaction never
commits, so no on_commit hook runs)."""

import logging
import os
from urllib.parse import quote, quote_from_bytes

import pytest
from django.test import Client
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from accounts.models import ApiToken
from models_app.models import InstanceEvent, ModelConfig
from tests.api.factories import make_instance

# Per visitor: the whole file runs in well under a minute on two cores. LLAMACONTROLLER_FUZZ_EXAMPLES=1000
# looks deeper.
EXAMPLES = int(os.environ.get("LLAMACONTROLLER_FUZZ_EXAMPLES", "60"))

# Form values: any character but lone surrogates (a browser cannot send them: they are not UTF-8), NUL included.
TEXT = st.text(st.characters(exclude_categories=("Cs",)), max_size=12)
NUMBERISH = st.one_of(
    st.integers(-5, 10**6).map(str),
    st.sampled_from(
        ["²", "١٠", "１０", "0", "-1", "99999999999999999999999", "1e3", " 1", "1.5", "", "\x00"]
    ),
    TEXT,
)
MODEL = st.one_of(st.sampled_from(["tiny", "tiny2", "nope", "", "tiny\x00"]), TEXT)
HOST = st.one_of(st.sampled_from(["testhost", "", "elsewhere", "testhost\x00"]), TEXT)
GPU = st.one_of(
    st.sampled_from(
        ["testhost:0", "testhost:1", "testhost:7", "elsewhere:0", "testhost:", ":0", "testhost:²"]
    ),
    st.tuples(HOST, NUMBERISH).map(":".join),
    TEXT,
)
# Query values: text, or raw bytes percent-encoded (not always UTF-8).
QUERY_VALUE = st.one_of(TEXT.map(quote), st.binary(max_size=6).map(quote_from_bytes))
# Rows a URL may name: running and stopped instances, the GPU, the visitor's token; missing and huge ids.
PK = st.sampled_from(["{running}", "{stopped}", "{gpu}", "{token}", "0", "999999", "99999999999999999999"])
WINDOW = st.one_of(st.sampled_from(["1h", "24h", "7d", "1d", "30d", ""]), TEXT)


def _query(**values) -> str:
    return "&".join(f"{name}={value}" for name, value in values.items() if value is not None)


def _form(path: str, **fields):
    """A POST of `fields` (optional ones may be missing) to `path`."""
    return st.fixed_dictionaries({}, optional=fields).map(lambda data: ("post", path, data))


def _page(path: str, **parameters):
    return st.fixed_dictionaries({}, optional=parameters).map(lambda q: ("get", f"{path}?{_query(**q)}", {}))


REQUESTS = st.one_of(
    _form("/load/", model_id=MODEL, gpu=st.lists(GPU, max_size=3), auto=st.sampled_from(["", "1"]) | TEXT,
          host=HOST, force=st.sampled_from(["", "1"]) | TEXT),
    _page("/load/estimate/", model_id=MODEL.map(quote), gpu=GPU.map(quote), host=HOST.map(quote)),
    PK.flatmap(lambda pk: _form(f"/instances/{pk}/unload/")),
    PK.flatmap(lambda pk: _form(f"/instances/{pk}/switch/", model_id=MODEL, force=TEXT)),
    PK.flatmap(lambda pk: _page(f"/instances/{pk}/log/")),
    _page("/events/", instance=NUMBERISH.map(quote) | QUERY_VALUE, user=QUERY_VALUE,
          kind=st.sampled_from(["requested", "login_failed"]) | QUERY_VALUE, page=NUMBERISH.map(quote)),
    _form("/accounts/login/", username=st.sampled_from(["viewer", "admin"]) | TEXT, password=TEXT,
          next=st.sampled_from(["/", "//evil.example/", "/events/"]) | TEXT),
    _form("/accounts/password/", old_password=st.sampled_from(["pw-viewer-123", "pw-operator-123"]) | TEXT,
          new_password1=TEXT, new_password2=TEXT),
    _form("/accounts/tokens/", name=TEXT, expires_in_days=NUMBERISH),
    PK.flatmap(lambda pk: _form(f"/accounts/tokens/{pk}/revoke/")),
    _page("/usage/", window=WINDOW.map(quote)),
    PK.flatmap(lambda pk: _page(f"/gpus/{pk}/history/", window=WINDOW.map(quote), resolution=NUMBERISH.map(quote))),
    PK.flatmap(lambda pk: _page(f"/instances/{pk}/history/", window=WINDOW.map(quote))),
    PK.flatmap(lambda pk: _form(f"/alerts/{pk}/acknowledge/", next=TEXT)),
    PK.flatmap(lambda pk: _form(f"/gpus/{pk}/orphans/4321/kill/")),
)  # fmt: skip


@pytest.fixture
def world(users, fake_gpus, tiny_model):
    """The operator's running instance of tiny on GPU 0, a stopped one, a second model, an event, a token."""
    ModelConfig.objects.create(id="tiny2", name="Tiny two", path=tiny_model.path)
    running = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    stopped = make_instance([fake_gpus.gpus[1]], tiny_model, owner=users["operator"], status="stopped")
    InstanceEvent.objects.create(instance=running, kind=InstanceEvent.Kind.REQUESTED, actor_name="operator")
    token, _ = ApiToken.issue(users["viewer"], "laptop")
    return {
        "users": users,
        "ids": {"running": running.pk, "stopped": stopped.pk, "gpu": fake_gpus.gpus[0].pk, "token": token.pk},
    }


@pytest.mark.parametrize("visitor", ["anonymous", "viewer", "operator", "admin"])
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
@given(call=REQUESTS)
def test_no_form_answers_5xx(visitor, call, world, caplog):
    method, path, data = call
    url = path.format(**world["ids"])  # query values are percent-encoded: no braces there
    client = Client()
    if visitor != "anonymous":
        client.force_login(world["users"][visitor])
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        response = client.post(url, data) if method == "post" else client.get(url)
    assert response.status_code < 500, (url, data, response.status_code)
    problems = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not problems, [(r.name, r.getMessage()) for r in problems]
