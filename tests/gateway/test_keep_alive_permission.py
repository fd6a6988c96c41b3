"""A request's keep_alive shortens an instance's idle timer only for a caller who may unload the instance
(issue 17, item 1); otherwise it is ignored and a header says so. Bad keep_alive values are a 400, never a
500 (inf, 1e999, NaN, huge numbers)."""

import json
from datetime import timedelta

import pytest
from django.utils import timezone

from gateway import access, translate
from models_app import keepalive, ondemand
from models_app.models import GpuInstance, Host, InstanceEvent, ModelConfig
from tests.gateway.fakes import request

pytestmark = pytest.mark.django_db(transaction=True)

HEADER = "X-LlamaController-Keep-Alive"
IGNORED = "ignored (you may not unload this model)"
MESSAGES = [{"role": "user", "content": "hi"}]


@pytest.fixture
def owned(instance, users, settings):
    """The `tiny` instance, loaded on demand by operator (the default keep-alive, 30 min, applies)."""
    settings.KEEP_ALIVE_SECONDS = 1800
    GpuInstance.objects.filter(pk=instance.pk).update(owner=users["operator"], loaded_on_demand=True)
    instance.refresh_from_db()
    return instance


def chat(auth, keep_alive, path="/api/chat", **extra):
    body = {"model": "tiny", "messages": MESSAGES, "stream": False, "keep_alive": keep_alive, **extra}
    return request("POST", path, body, auth=auth)


def kept(instance) -> tuple:
    return tuple(
        GpuInstance.objects.filter(pk=instance.pk).values_list("keep_alive_seconds", "keep_alive_by")[0]
    )


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_viewer_cannot_shorten_someone_elses_instance(owned, llama, users, bearer, path):
    status, response, content = chat(bearer(users["viewer"]), 0, path=path)
    assert status == 200, content
    assert response[HEADER] == IGNORED
    assert kept(owned) == (None, "")
    # The timer is the default's: the instance is not unloaded a second later.
    ago = timezone.now() - timedelta(seconds=5)
    GpuInstance.objects.filter(pk=owned.pk).update(last_used_at=ago, loaded_at=ago)
    assert ondemand.unload_idle() == []
    assert GpuInstance.objects.get(pk=owned.pk).status == GpuInstance.Status.RUNNING


def test_another_operator_cannot_shorten_it_either(owned, llama, users, bearer):
    status, response, _ = chat(bearer(users["operator2"]), "1s", path="/api/generate", prompt="hi")
    assert status == 200 and response[HEADER] == IGNORED
    assert kept(owned) == (None, "")


def test_anonymous_cannot_shorten_a_model_open_to_anonymous_use(owned, llama):
    ModelConfig.objects.filter(pk="tiny").update(allow_anonymous=True)
    status, response, _ = chat(None, "1s")
    assert status == 200 and response[HEADER] == IGNORED
    assert kept(owned) == (None, "")


def test_a_hand_loaded_instance_whose_model_sets_a_keep_alive(instance, llama, users, bearer):
    ModelConfig.objects.filter(pk="tiny").update(keep_alive_seconds=600)
    GpuInstance.objects.filter(pk=instance.pk).update(owner=users["operator"])
    status, response, _ = chat(bearer(users["viewer"]), "1s", path="/api/embed", input="hi")
    assert status == 200 and response[HEADER] == IGNORED
    assert kept(instance) == (None, "")


def test_the_owner_and_an_admin_may_shorten_it(owned, llama, users, bearer):
    status, response, _ = chat(bearer(users["operator"]), "1s")
    assert status == 200 and HEADER not in response
    assert kept(owned) == (1, "operator")
    status, response, _ = chat(bearer(users["admin"]), "0s", path="/v1/chat/completions")
    assert status == 200 and HEADER not in response
    assert kept(owned) == (0, "admin")


def test_anyone_who_may_use_it_may_lengthen_it(owned, llama, users, bearer, settings):
    settings.GATEWAY_MAX_KEEP_ALIVE_SECONDS = 7200
    status, response, _ = chat(bearer(users["viewer"]), "1h")
    assert status == 200 and HEADER not in response
    assert kept(owned) == (3600, "viewer")
    status, response, _ = chat(bearer(users["viewer"]), "45m")  # shorter than the viewer's own hour
    assert response[HEADER] == IGNORED and kept(owned) == (3600, "viewer")
    status, response, _ = chat(bearer(users["viewer"]), -1)  # forever: the admin's limit
    assert HEADER not in response and kept(owned) == (7200, "viewer")


def test_a_stale_cached_row_cannot_shorten_the_timer(owned, llama, users, bearer):
    """The gateway caches instance rows: the UPDATE itself compares with the row's current keep-alive."""
    header = bearer(users["viewer"])
    assert chat(header, None)[0] == 200  # the instance is cached now, with no keep_alive of its own
    GpuInstance.objects.filter(pk=owned.pk).update(keep_alive_seconds=7200, keep_alive_by="operator")
    assert access.cached_instances("tiny")[0].keep_alive_seconds is None
    status, response, _ = chat(header, "45m")  # longer than the 30 min default, shorter than the row's
    assert status == 200 and response[HEADER] == IGNORED
    assert kept(owned) == (7200, "operator")


def test_a_load_on_demand_for_a_viewer_keeps_only_a_longer_keep_alive(fake_gpus, tiny_model, users):
    """ensure_running applies the same rule (the viewer's own load on demand is not theirs to unload)."""
    ModelConfig.objects.filter(pk="tiny").update(on_demand=True)
    row = GpuInstance.objects.create(
        model=tiny_model, host=fake_gpus.host, gpu_ids="0", status=GpuInstance.Status.RUNNING, port=18999,
        loaded_on_demand=True, owner=users["viewer"], loaded_at=timezone.now(),
    )  # fmt: skip
    tiny_model.refresh_from_db()
    assert (
        ondemand.ensure_running(tiny_model, users["viewer"], keep_alive_seconds=5).keep_alive_seconds is None
    )
    assert ondemand.ensure_running(tiny_model, users["viewer"], keep_alive_seconds=7200).pk == row.pk
    assert kept(row) == (7200, "viewer")


def test_the_idle_unload_event_names_who_asked(owned, llama, users, bearer, sent):
    Host.objects.filter(pk=owned.host_id).update(last_seen=timezone.now())
    assert chat(bearer(users["operator"]), "1s")[0] == 200
    ago = timezone.now() - timedelta(seconds=3)
    GpuInstance.objects.filter(pk=owned.pk).update(last_used_at=ago, loaded_at=ago)
    assert [row.pk for row in ondemand.unload_idle()] == [owned.pk]
    event = InstanceEvent.objects.get(instance=owned, kind=InstanceEvent.Kind.IDLE_UNLOAD)
    assert event.detail == "idle for 3 s (keep-alive 1 s, asked by operator's request)", event.detail
    assert [name for name, _, _ in sent] == ["unload_model"]


def test_an_anonymous_keep_alive_is_named_so(owned, llama, settings, sent):
    settings.KEEP_ALIVE_SECONDS = 60
    ModelConfig.objects.filter(pk="tiny").update(allow_anonymous=True)
    Host.objects.filter(pk=owned.host_id).update(last_seen=timezone.now())
    assert chat(None, "2m")[0] == 200  # longer than the default: anyone may
    assert kept(owned) == (120, keepalive.ANONYMOUS)
    ago = timezone.now() - timedelta(seconds=121)
    GpuInstance.objects.filter(pk=owned.pk).update(last_used_at=ago, loaded_at=ago)
    ondemand.unload_idle()
    event = InstanceEvent.objects.get(instance=owned, kind=InstanceEvent.Kind.IDLE_UNLOAD)
    assert event.detail.endswith("(keep-alive 2 min, asked by an anonymous request)"), event.detail


# --- bad values: 400, never 500 ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b'"inf"',
        b"1e999",
        b"-1e999",
        b"NaN",
        b'"nan"',
        b'"Infinity"',
        b'"1e999"',
        b'"1_000"',
        b'"9999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999'
        b"99999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999"
        b"99999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999"
        b'9999999999999999999999999999999999999999999999999999999999999999999999999999999999999999999h"',
        b'"--5m"',
        b'"5m-"',
        b"[1]",
        b"{}",
        b"true",
    ],
)
@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
def test_a_bad_keep_alive_is_a_clear_400(owned, llama, users, bearer, path, raw):
    ModelConfig.objects.filter(pk="tiny").update(allow_anonymous=True)
    body = b'{"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "keep_alive": ' + raw + b"}"
    status, _, content = request("POST", path, raw=body, auth=bearer(users["operator"]))
    assert status == 400, content
    assert "keep_alive" in content.decode()
    # Anonymous (the model allows it): refused too, never a 500 (401 on Ollama's routes: a body refused
    # before the model is looked up asks for credentials first).
    assert request("POST", path, raw=body)[0] in (400, 401)
    assert kept(owned) == (None, "") and not llama.seen


def test_huge_keep_alive_values_are_capped(owned, llama, users, bearer, settings):
    settings.GATEWAY_MAX_KEEP_ALIVE_SECONDS = 3600
    header = bearer(users["operator"])
    for value in (10**400, 1e300, "99999999999h", -(10**400), "-1"):
        status, _, content = chat(header, value)
        assert status == 200, (value, content)
        assert kept(owned) == (3600, "operator"), value


@pytest.mark.parametrize(
    "value, seconds",
    [
        (10**400, 10**9),
        (-(10**400), translate.FOREVER),
        (1e300, 10**9),
        ("+5m", 300),
        ("1m30s", 90),
        ("1.5h", 5400),
        ("250ms", 1),
        ("-1m5s", translate.FOREVER),
        (" 60 ", 60),
    ],
)
def test_keep_alive_parsing_edges(value, seconds):
    assert translate.keep_alive_seconds(value) == seconds


@pytest.mark.parametrize(
    "value", [float("inf"), float("-inf"), float("nan"), "inf", "1e999", "١٢", "1_0", "5 m"]
)
def test_keep_alive_refusals(value):
    with pytest.raises(translate.BadRequest):
        translate.keep_alive_seconds(value)


def test_the_header_is_absent_without_a_keep_alive(owned, llama, users, bearer):
    status, response, content = chat(bearer(users["viewer"]), None)
    assert status == 200 and HEADER not in response
    assert json.loads(content)["message"]["content"] == "Hello"
