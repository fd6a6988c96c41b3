"""Issue 17 item 6, the inputs that were 500s on the web pages (NUL characters on PostgreSQL, digits of other
scripts everywhere) and the 403s that each logged a traceback. The suite runs on SQLite and PostgreSQL; the NUL
cases were 500s on PostgreSQL only."""

import logging

import pytest
from django.test import Client

from models_app.models import GpuInstance, InstanceEvent
from tests.api.factories import make_instance

NUL_PAGES = [
    ("get", "/events/?user=%00", {}),
    ("get", "/events/?kind=%00", {}),
    ("get", "/events/?user=bob&x%00=1", {}),  # a NUL in a parameter's name
    ("get", "/load/estimate/?model_id=%00", {}),
    ("get", "/load/estimate/?model_id=tiny&host=a%00", {}),
    ("post", "/load/", {"model_id": "x\x00", "gpu": "testhost:0"}),
    ("post", "/load/", {"model_id": "tiny", "gpu": "test\x00host:0"}),  # the GPU's host
    ("post", "/load/", {"model_id": "tiny", "auto": "1", "host": "a\x00"}),
    ("post", "/instances/1/switch/", {"model_id": "x\x00"}),
    ("get", "/admin/models_app/modelconfig/?q=%00", {}),
]


def client_of(user) -> Client:
    client = Client(raise_request_exception=False)
    client.force_login(user)
    return client


@pytest.mark.parametrize(("method", "url", "data"), NUL_PAGES, ids=[f"{m} {u} {d}" for m, u, d in NUL_PAGES])
def test_a_nul_character_in_a_parameter_is_400(method, url, data, users, fake_gpus, tiny_model):
    make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["admin"])
    before = (GpuInstance.objects.count(), InstanceEvent.objects.count())
    response = getattr(client_of(users["admin"]), method)(url, data)
    assert response.status_code == 400
    assert "must not contain NUL characters" in response.content.decode()
    assert (GpuInstance.objects.count(), InstanceEvent.objects.count()) == before  # nothing half-written


def test_the_rest_api_answers_a_nul_character_in_its_own_shape(users, tiny_model):
    client = client_of(users["admin"])
    assert client.get("/api/v1/models/?x=a%00").json() == {"x": ["must not contain NUL characters"]}
    response = client.get("/api/v1/models/tiny%00/")  # the path: a model id is any string
    assert response.status_code == 400
    assert response.json() == {"detail": "the URL path must not contain NUL characters"}


@pytest.mark.parametrize("instance", ["²", "١٠", "１０", "-1", "0", "99999999999999999999", "abc"])
def test_the_events_instance_filter_takes_ascii_digits_only(instance, users, fake_gpus, tiny_model):
    make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["admin"])
    response = client_of(users["admin"]).get("/events/", {"instance": instance})
    assert response.status_code == 400
    assert "Instance must be a whole number from 1 to" in response.content.decode()
    assert list(response.context["page"]) == []


def test_the_events_instance_filter_still_filters(users, fake_gpus, tiny_model):
    first = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["admin"])
    second = make_instance([fake_gpus.gpus[1]], tiny_model, owner=users["admin"])
    for instance in (first, second):
        InstanceEvent.objects.create(instance=instance, kind=InstanceEvent.Kind.REQUESTED, actor_name="admin")
    response = client_of(users["admin"]).get("/events/", {"instance": str(first.pk)})
    assert response.status_code == 200
    events = list(response.context["page"])
    assert events and {e.instance_id for e in events} == {first.pk}


@pytest.mark.parametrize("days", ["١٠", "²", "１０"])
def test_the_token_form_takes_ascii_digits_only(days, users):
    client = client_of(users["viewer"])
    response = client.post("/accounts/tokens/", {"name": "laptop", "expires_in_days": days})
    assert response.status_code == 400
    assert response.context["form"].errors == {"expires_in_days": ["Enter a whole number."]}
    assert not users["viewer"].api_tokens.exists()


@pytest.mark.parametrize(
    ("who", "url"), [("outsider", "/"), ("outsider", "/events/"), ("viewer", "/load/estimate/?model_id=tiny")]
)
def test_a_403_logs_one_line_without_a_traceback(who, url, users, caplog):
    client = client_of(users[who])
    with caplog.at_level(logging.INFO, logger="django"):
        response = client.get(url)
    assert response.status_code == 403
    records = [r for r in caplog.records if r.name.startswith("django")]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.WARNING, f"Forbidden: {url.split('?')[0]}")
    ]
    assert records[0].exc_info is None
