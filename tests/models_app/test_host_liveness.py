"""A host whose worker cannot take work (issue 16, item 6). Its heartbeat is written only when the worker
answered a ping through the broker, and the resends of its pending loads and their limit are beat's, on the
default queue: seen before, a load to such a host stayed `pending` for 5 min 33 s with no resend and no
failure, because the resends ran in the host's own reconcile pass, on the queue nobody read."""

from datetime import timedelta

import pytest
from celery import Celery
from django.utils import timezone

from gpus.models import Host
from models_app import cluster, reconcile
from models_app.models import GpuInstance, InstanceEvent
from models_app.services import request_load, request_unload
from tests.helpers import age_events, keep_host_up

Status = GpuInstance.Status


def test_a_load_nobody_takes_is_resent_and_given_up_by_beat_alone(fake_gpus, tiny_model, sent, beat):
    """No reconcile pass runs on the host (its worker reads nothing); beat resends and then fails it."""
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    assert beat() == {}  # just asked for: the task is on its way
    waits = []
    for n in range(1, reconcile.MAX_RESENDS + 1):
        waited = reconcile.GRACE_SECONDS * 2 ** (n - 1) + 1
        age_events(instance, waited - 2)
        keep_host_up(fake_gpus.host)
        assert beat() == {}, f"resend {n} came before its wait"
        age_events(instance, waited)
        assert beat() == {"resent": 1}
        waits.append(waited)
    assert [name for name, *_ in sent] == ["load_model"] * reconcile.MAX_RESENDS
    assert all(options == {"queue": "host.testhost"} for *_, options in sent)
    resends = instance.events.filter(detail__startswith="sent again").order_by("id")
    details = list(resends.values_list("detail", flat=True))
    assert details[-1] == "sent again to host.testhost: no worker took the load (3 of 3)"
    age_events(instance, reconcile.GRACE_SECONDS * 2**reconcile.MAX_RESENDS + 1)
    assert beat() == {"failed": 1}
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.error.startswith(
        "host testhost did not take the load (sent 4 times to host.testhost, the last 80s ago): "
        "its worker takes no work from its queue"
    ), instance.error
    assert not instance.gpu_links.filter(active=True).exists()
    assert waits == [11, 21, 41]  # the README's 10 s, 20 s, 40 s


def test_a_load_asked_for_before_the_worker_restarted_is_resent_at_once(fake_gpus, tiny_model, sent, beat):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    age_events(instance, 2)
    Host.objects.filter(pk=fake_gpus.host.pk).update(worker_started_at=timezone.now())
    assert beat() == {"resent": 1}


def test_the_hosts_own_pass_no_longer_resends_loads(
    fake_gpus, tiny_model, sent, django_capture_on_commit_callbacks
):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    age_events(instance, 1000)
    with django_capture_on_commit_callbacks(execute=True):
        assert reconcile.reconcile_host("testhost") == {}
    assert sent == []


def test_an_unload_nobody_finishes_is_given_up_by_beat_naming_the_host(fake_gpus, tiny_model, sent, beat):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    GpuInstance.objects.filter(pk=instance.pk).update(status=Status.RUNNING)
    instance.refresh_from_db()
    request_unload(instance=instance, actor=None)
    age_events(instance, 150)  # the host's own pass would still be resending
    assert beat() == {}
    age_events(instance, 10_000)
    assert beat() == {"failed": 1}
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert instance.error.startswith("host testhost did not take the unload within "), instance.error
    assert "its llama-server may still run" in instance.error


def test_a_down_hosts_work_is_left_to_the_down_pass(fake_gpus, tiny_model, sent, beat, settings):
    """The resends are for hosts that are up; a down host's pending work fails with the host's reason."""
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    age_events(instance, 1000)
    Host.objects.filter(pk=fake_gpus.host.pk).update(last_seen=timezone.now() - timedelta(seconds=999))
    done = beat()
    assert done.get("failed") == 1 and "resent" not in done
    instance.refresh_from_db()
    assert instance.events.filter(kind=InstanceEvent.Kind.HOST_LOST).exists()


# --- the heartbeat: "up" means the worker takes work --------------------------------------------------


@pytest.fixture
def claimed(fake_gpus):
    me = cluster.this_worker()
    cluster.claim("testhost", me)
    old = timezone.now() - timedelta(seconds=5)
    Host.objects.filter(name="testhost").update(last_seen=old)
    return me, old


def test_no_heartbeat_while_the_worker_cannot_take_work(claimed, caplog):
    me, old = claimed
    answers = ["the broker cannot be reached: Error 111 connecting to 127.0.0.1:43509. Connection refused."]
    beat = cluster.Heartbeat("testhost", me, probe=lambda: answers[0])
    assert beat.beat()  # the worker goes on (it may reconnect), but writes no heartbeat
    assert beat.beat()
    assert Host.objects.get(name="testhost").last_seen == old
    errors = [r.message for r in caplog.records if "no heartbeat written" in r.message]
    assert errors == [f"testhost: no heartbeat written: {answers[0]}"]  # once, not at every beat
    answers[0] = None  # it answers again
    assert beat.beat()
    assert Host.objects.get(name="testhost").last_seen > old
    assert any("heartbeats resume" in r.message for r in caplog.records)


def test_a_worker_that_answers_beats_as_before(claimed):
    me, old = claimed
    assert cluster.Heartbeat("testhost", me, probe=lambda: None).beat()
    assert Host.objects.get(name="testhost").last_seen > old


def test_the_probe_pings_through_the_broker(settings):
    """Against a broker address where nothing listens (what the worker retried in the issue), and against
    the real test broker with no such worker."""
    from llamacontroller_site.celery import app

    settings.HOST_HEARTBEAT_SECONDS = 2  # the ping waits half a beat for the answer, at least 1 s
    dead = Celery("probe-test", broker="redis://127.0.0.1:1/0")
    dead.conf.broker_transport_options = {"socket_connect_timeout": 1}
    reason = cluster.broker_probe(dead, "testhost@nowhere")()
    assert reason.startswith("the broker cannot be reached: "), reason
    reason = cluster.broker_probe(app, "nobody@nowhere")()
    assert reason == "the worker did not answer a ping through the broker within 1s"
