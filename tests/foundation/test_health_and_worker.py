"""/healthz and a real Celery worker on real Redis."""

import pytest

from gpus.models import Host


@pytest.mark.django_db(transaction=True)
def test_a_real_worker_runs_a_ping_task(start_worker):
    from llamacontroller_site.celery import ping

    start_worker()
    assert ping.delay().get(timeout=20) == "pong"


@pytest.mark.django_db(transaction=True)
def test_healthz_ok_with_a_live_worker(client, start_worker, users):
    Host.objects.update(last_seen=None)  # only a real worker answering a ping counts
    start_worker()
    assert client.get("/healthz").json() == {"status": "ok"}
    client.force_login(users["admin"])
    response = client.get("/healthz")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "ok"
    assert body["database"]["ok"] and body["broker"]["ok"] and body["workers"]["ok"]


@pytest.mark.django_db
def test_healthz_503_when_the_broker_is_down(client, settings, users):
    settings.REDIS_URL = "redis://127.0.0.1:1/0"
    anonymous = client.get("/healthz")
    assert anonymous.status_code == 503
    assert anonymous.json() == {"status": "error"}  # no error text, no host names for strangers
    client.force_login(users["admin"])
    response = client.get("/healthz")
    assert response.status_code == 503
    body = response.json()
    assert body["status"] == "error"
    assert not body["broker"]["ok"] and "broker unreachable" in body["broker"]["error"]
    assert body["database"]["ok"]


@pytest.mark.django_db
def test_healthz_503_without_any_worker(client, fake_gpus, users):
    Host.objects.update(last_seen=None)
    client.force_login(users["admin"])
    response = client.get("/healthz")
    assert response.status_code == 503
    assert "no worker" in response.json()["workers"]["error"]


@pytest.mark.django_db
def test_healthz_broker_ping_is_cached(client, monkeypatch):
    """Anonymous pollers cannot turn /healthz into load on the broker: one ping per few seconds."""
    import redis

    pings = []
    real_ping = redis.Redis.ping
    monkeypatch.setattr(redis.Redis, "ping", lambda self, **kw: pings.append(1) or real_ping(self, **kw))
    from models_app import health

    health._broker_answers.clear()
    for _ in range(20):
        client.get("/healthz")
    assert len(pings) == 1
