"""Two beats by mistake do not double-act (utilities/periodic.py): every periodic task is guarded by a short Redis
lock or idempotent. Against the tests' real Redis (the Celery broker)."""

import importlib
import logging
import threading
import time
import uuid

import pytest
import redis
from django.conf import settings as django_settings
from django.utils import timezone

from gpus.models import Host
from utilities import periodic


@pytest.fixture
def locks_on(settings):
    """The test settings turn the locks off; these tests are about them."""
    settings.PERIODIC_LOCKS = True
    url = settings.REDIS_URL  # a test may point the settings elsewhere
    keys = []
    yield keys
    if keys:
        redis.Redis.from_url(url).delete(*keys)


def fresh_name(keys: list[str]) -> str:
    name = f"tests.beat_once.{uuid.uuid4().hex[:8]}"
    keys.append(periodic.lock_key(name))
    return name


def beat_task(name: str):
    module, attr = name.rsplit(".", 1)
    return getattr(importlib.import_module(module), attr)


def test_every_beat_task_is_guarded_or_idempotent():
    """A periodic task added without a thought for two beats fails here; a lock lasts 0.8 of its period."""
    for entry, spec in django_settings.CELERY_BEAT_SCHEDULE.items():
        guard = getattr(beat_task(spec["task"]).run, "periodic_guard", None)
        assert guard, f"{entry}: {spec['task']} needs @once_per_period or @idempotent (utilities/periodic.py)"
        if guard[0] == "once_per_period":
            assert guard[1] == spec["task"], entry  # locked under its own name
            assert periodic.period_of(guard) == spec["schedule"], entry
        else:
            assert guard[0] == "idempotent" and guard[1], entry


@pytest.mark.django_db
def test_a_dispatcher_sent_twice_fans_out_once(locks_on, settings):
    """Two beats send dispatch_reconcile for the same period: one reconcile message reaches the host's queue."""
    from models_app import tasks

    host = Host.objects.create(name=f"beat-{uuid.uuid4().hex[:8]}", last_seen=timezone.now())
    broker = redis.Redis.from_url(settings.REDIS_URL)
    lock = periodic.lock_key("models_app.tasks.dispatch_reconcile")
    broker.delete(lock, host.queue)
    locks_on.append(host.queue)
    locks_on.append(lock)

    assert tasks.dispatch_reconcile() == 1
    assert tasks.dispatch_reconcile() is None  # the second beat's message: skipped
    assert broker.llen(host.queue) == 1
    ttl_ms = broker.pttl(lock)
    assert 0 < ttl_ms <= settings.RECONCILE_SECONDS * 0.8 * 1000


def test_two_threads_at_once_act_once(locks_on):
    name = fresh_name(locks_on)
    acted = []
    start = threading.Barrier(8)

    @periodic.once_per_period(30, name=name)
    def tick():
        acted.append(threading.get_ident())

    def run():
        start.wait()
        tick()

    threads = [threading.Thread(target=run) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(acted) == 1


def test_it_acts_again_once_the_lock_expires(locks_on):
    name = fresh_name(locks_on)
    acted = []

    @periodic.once_per_period(0.5, name=name)
    def tick():
        acted.append(time.monotonic())
        return "acted"

    assert tick() == "acted"
    assert tick() is None
    time.sleep(0.45)  # the lock lasts 0.8 of the period: 0.4 s
    assert tick() == "acted"
    assert len(acted) == 2


def test_a_redis_outage_still_runs_the_task(locks_on, settings, caplog):
    """A missed lock doubles a period's work; a missed run would lose it."""
    name = fresh_name(locks_on)
    settings.REDIS_URL = "redis://127.0.0.1:1/0"  # nothing listens there
    acted = []

    @periodic.once_per_period(30, name=name)
    def tick():
        acted.append(1)

    with caplog.at_level(logging.WARNING, logger="utilities.periodic"):
        tick()
        tick()
    assert len(acted) == 2
    assert "running anyway" in caplog.text


def test_the_lock_is_per_task(locks_on):
    first, second = fresh_name(locks_on), fresh_name(locks_on)
    assert periodic.claim_period(first, 30)
    assert periodic.claim_period(second, 30)
    assert not periodic.claim_period(first, 30)
