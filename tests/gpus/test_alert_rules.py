"""Alert rules over plain rows: each rule fires once, stays open while its condition holds, resolves with
hysteresis, and is acknowledged; the leak rule's least-squares slope; delivery by webhook and e-mail."""

from datetime import timedelta

import pytest
from django.core import mail
from django.utils import timezone

from gpus import alerts, notify, tasks
from gpus.alert_rules import InstanceFacts, leak_rate, leak_slope
from gpus.models import Alert, AlertRule, Gpu, Host, MemorySample
from utilities import dispatch

pytestmark = pytest.mark.django_db

T0 = timezone.now().replace(microsecond=0)


def at(minutes: float):
    return T0 + timedelta(minutes=minutes)


@pytest.fixture
def host():
    AlertRule.objects.all().delete()  # the defaults of the data migration; each test makes its own
    return Host.objects.create(name="box", last_seen=T0)


@pytest.fixture
def gpu(host):
    return Gpu.objects.create(host=host, index=0, uuid="GPU-a", name="Test GPU", memory_total_mib=10000)


def rule(kind, **fields):
    defaults = {"threshold": 0, "hysteresis": 0, "for_minutes": 0, "window_minutes": 60, "clear_minutes": 0}
    return AlertRule.objects.create(
        name=f"{kind} {AlertRule.objects.count()}", kind=kind, **{**defaults, **fields}
    )


def set_used(gpu, used, state=Gpu.State.MODEL_LOADED, processes=()):
    Gpu.objects.filter(pk=gpu.pk).update(memory_used_mib=used, state=state, processes=list(processes))


def evaluate(minutes, instances=()):
    return [(t.event, t.rule_name) for t in alerts.evaluate_host("box", list(instances), now=at(minutes))]


def only_alert():
    return Alert.objects.get()


class TestGpuUsedPercent:
    def test_pending_then_fires_once_stays_open_and_resolves_below_the_hysteresis(self, gpu):
        r = rule("gpu_used_pct", threshold=90, hysteresis=5, for_minutes=5)
        set_used(gpu, 9500)
        assert evaluate(0) == []
        assert only_alert().status == "pending"
        assert evaluate(4) == []
        assert evaluate(5) == [("fired", r.name)]
        assert only_alert().status == "open" and only_alert().value == 95.0
        assert evaluate(6) == []  # fires once
        set_used(gpu, 8800)  # below the threshold, inside the hysteresis band: still open
        assert evaluate(7) == []
        assert only_alert().status == "open"
        set_used(gpu, 8400)  # past the hysteresis (< 85 %)
        assert evaluate(8) == [("resolved", r.name)]
        alert = only_alert()
        assert (alert.status, alert.fired_at, alert.resolved_at) == ("resolved", at(5), at(8))
        set_used(gpu, 9600)  # a new occurrence is a new alert
        evaluate(9)
        assert Alert.objects.filter(status="pending").count() == 1

    def test_a_dip_before_for_minutes_forgets_the_pending_alert(self, gpu):
        rule("gpu_used_pct", threshold=90, for_minutes=5)
        set_used(gpu, 9500)
        evaluate(0)
        set_used(gpu, 1000)
        evaluate(2)
        set_used(gpu, 9500)
        evaluate(3)
        assert evaluate(7) == []  # counted again from minute 3
        assert evaluate(8) == [("fired", AlertRule.objects.get().name)]

    def test_resolving_waits_for_clear_minutes(self, gpu):
        rule("gpu_used_pct", threshold=90, clear_minutes=3)
        set_used(gpu, 9500)
        assert evaluate(0)[0][0] == "fired"
        set_used(gpu, 1000)
        assert evaluate(1) == []
        set_used(gpu, 9500)  # back over: the clear time starts again
        evaluate(2)
        set_used(gpu, 1000)
        evaluate(3)
        assert evaluate(5) == []
        assert evaluate(6)[0][0] == "resolved"

    def test_disabled_rule_resolves_its_open_alerts(self, gpu):
        r = rule("gpu_used_pct", threshold=50)
        set_used(gpu, 9500)
        evaluate(0)
        AlertRule.objects.filter(pk=r.pk).update(enabled=False)
        assert evaluate(1) == [("resolved", r.name)]


class TestHeadroom:
    def test_fires_within_m_mib_of_the_total_and_resolves_with_hysteresis(self, gpu):
        r = rule("gpu_headroom", threshold=1024, hysteresis=512)
        set_used(gpu, 9000)  # 1000 MiB free
        assert evaluate(0) == [("fired", r.name)]
        assert "only 1000 MiB" in only_alert().message
        set_used(gpu, 8700)  # 1300 free: inside the band
        assert evaluate(1) == []
        set_used(gpu, 8000)  # 2000 free
        assert evaluate(2) == [("resolved", r.name)]


class TestForeignProcess:
    def test_fires_only_on_a_gpu_that_serves_one_of_our_instances(self, gpu):
        r = rule("foreign_process")
        theirs = {"pid": 42, "name": "train.py", "used_mib": 3000, "owner": "foreign", "instance_id": None}
        ours = {"pid": 7, "name": "llama-server", "used_mib": 500, "owner": "instance", "instance_id": 1}
        set_used(gpu, 3500, state=Gpu.State.OCCUPIED_BY_OTHERS, processes=[theirs])
        assert evaluate(0) == []
        set_used(gpu, 3500, processes=[ours, theirs])
        assert evaluate(1) == [("fired", r.name)]
        assert "train.py (pid 42, 3000 MiB)" in only_alert().message
        set_used(gpu, 500, processes=[ours])
        assert evaluate(2) == [("resolved", r.name)]


class TestLeak:
    def test_slope_is_least_squares_in_mib_per_hour(self):
        assert leak_slope([(0, 100), (1800, 600), (3600, 1100)]) == pytest.approx(1000)

    def test_one_jump_is_not_a_leak_but_steady_growth_is(self):
        flat_with_jump = [(t * 60, 1000) for t in range(30)] + [(t * 60, 1400) for t in range(30, 61)]
        assert leak_slope(flat_with_jump) > 500  # the plain slope of a step is large…
        assert leak_rate(flat_with_jump) == pytest.approx(0, abs=1)  # …but each half of it is flat
        noisy_growth = [(t * 60, 1000 + 10 * t + (7 if t % 2 else -7)) for t in range(61)]
        assert leak_rate(noisy_growth) == pytest.approx(600, rel=0.05)
        assert leak_slope([(5, 1), (5, 2)]) is None
        assert leak_slope([(0, 1)]) is None

    def samples(self, instance_id, start_minute, end_minute, mib_per_hour, base=1000):
        MemorySample.objects.bulk_create(
            MemorySample(
                instance_id=instance_id,
                taken_at=at(m),
                used_mib=int(base + mib_per_hour * (m - start_minute) / 60),
                total_mib=10000,
            )
            for m in range(start_minute, end_minute + 1)
        )

    def test_growth_over_the_window_fires_and_flattening_resolves(self, gpu):
        r = rule("instance_leak", threshold=500, hysteresis=200, window_minutes=30)
        facts = [InstanceFacts(9, "Tiny (#9) on box GPU 0", (gpu.pk,), "running")]
        self.samples(9, -30, 0, mib_per_hour=2000)
        assert evaluate(0, facts) == [("fired", r.name)]
        alert = only_alert()
        assert (alert.instance_id, alert.value) == (9, pytest.approx(2000, rel=0.02))
        # Flat from now on: the slope over the last 30 minutes falls as the growth leaves the window.
        last = 1000 + 2000 * 30 / 60
        MemorySample.objects.bulk_create(
            MemorySample(instance_id=9, taken_at=at(m), used_mib=int(last), total_mib=10000)
            for m in range(1, 31)
        )
        assert evaluate(30, facts) == [("resolved", r.name)]

    def test_no_verdict_on_a_short_series_or_a_single_jump(self, gpu):
        rule("instance_leak", threshold=500, window_minutes=60)
        facts = [InstanceFacts(9, "x", (gpu.pk,), "running")]
        self.samples(9, -10, 0, mib_per_hour=5000)  # covers a sixth of the window: no verdict
        assert evaluate(0, facts) == []
        assert not Alert.objects.exists()

    def test_reads_only_the_window(self, gpu, django_assert_max_num_queries):
        rule("instance_leak", threshold=500, window_minutes=30)
        facts = [InstanceFacts(9, "x", (gpu.pk,), "running")]
        self.samples(9, -600, -31, mib_per_hour=5000)  # old growth, outside the window
        self.samples(9, -30, 0, mib_per_hour=0, base=5000)
        assert evaluate(0, facts) == []
        assert alerts.instance_series([9], 30, at(0))[9][0][0] >= at(-30).timestamp()

    def test_unloaded_instance_resolves(self, gpu):
        r = rule("instance_leak", threshold=500, window_minutes=30)
        self.samples(9, -30, 0, mib_per_hour=2000)
        evaluate(0, [InstanceFacts(9, "x", (gpu.pk,), "running")])
        assert evaluate(1, []) == [("resolved", r.name)]


class TestCrash:
    def test_open_for_the_window_after_the_crash(self, gpu):
        r = rule("instance_crashed", window_minutes=60)
        crashed = [InstanceFacts(5, "Tiny (#5) on box GPU 0", (gpu.pk,), "crashed", ended_at=at(0))]
        assert evaluate(1, crashed) == [("fired", r.name)]
        assert "crashed at" in only_alert().message
        assert evaluate(30, crashed) == []
        assert evaluate(61, crashed) == [("resolved", r.name)]


class TestEvicted:
    def test_an_eviction_reaches_the_channels_with_its_sentence(self, gpu):
        r = rule("instance_evicted", window_minutes=10)
        sentence = (
            "beta (#5, loaded on demand by ann) was unloaded for bob's request for gamma on GPU 0 of box"
        )
        evicted = [InstanceFacts(5, "instance #5", (gpu.pk,), "stopped", ended_at=at(0), evicted=sentence)]
        assert evaluate(1, evicted) == [("fired", r.name)]
        assert only_alert().message == sentence
        assert evaluate(11, evicted) == [("resolved", r.name)]
        crashed_rule_ignores_it = [InstanceFacts(6, "x", (gpu.pk,), "stopped", ended_at=at(0))]
        assert evaluate(12, crashed_rule_ignores_it) == []


class TestTelemetry:
    def test_failing_query_for_n_minutes_fires_and_a_good_query_resolves(self, host, gpu):
        r = rule("telemetry_failing", for_minutes=2, clear_minutes=1)
        Host.objects.filter(pk=host.pk).update(telemetry_error="NVML: Driver Not Loaded", last_seen=at(0))
        assert alerts.evaluate_telemetry(now=at(0)) == []
        Host.objects.filter(pk=host.pk).update(last_seen=at(2))
        fired = alerts.evaluate_telemetry(now=at(2))
        assert [(t.event, t.rule_name) for t in fired] == [("fired", r.name)]
        assert "Driver Not Loaded" in only_alert().message
        Host.objects.filter(pk=host.pk).update(telemetry_error="", last_seen=at(3))
        assert alerts.evaluate_telemetry(now=at(3)) == []  # clear for less than clear_minutes
        Host.objects.filter(pk=host.pk).update(last_seen=at(4))
        assert [t.event for t in alerts.evaluate_telemetry(now=at(4))] == ["resolved"]

    def test_a_silent_host_fires(self, host, gpu, settings):
        settings.GPU_REFRESH_SECONDS = 15
        rule("telemetry_failing", for_minutes=1)
        Host.objects.filter(pk=host.pk).update(last_seen=at(0))
        assert alerts.evaluate_telemetry(now=at(0.5)) == []  # within three refresh intervals
        assert alerts.evaluate_telemetry(now=at(1)) == []  # silent: pending for for_minutes
        assert [t.event for t in alerts.evaluate_telemetry(now=at(2))] == ["fired"]
        assert "no telemetry since" in only_alert().message


class TestAcknowledgeAndDelivery:
    def test_acknowledge_keeps_it_open(self, gpu):
        rule("gpu_used_pct", threshold=50)
        set_used(gpu, 9000)
        evaluate(0)
        alerts.acknowledge(only_alert(), "admin")
        evaluate(1)
        alert = only_alert()
        assert (alert.status, alert.acknowledged_by) == ("open", "admin")

    def test_firing_enqueues_delivery_on_commit(self, gpu, django_capture_on_commit_callbacks, monkeypatch):
        sent = []
        monkeypatch.setattr(
            dispatch, "publish", lambda name, args, options: sent.append((name, tuple(args), options))
        )
        rule("gpu_used_pct", threshold=50)
        set_used(gpu, 9000)
        with django_capture_on_commit_callbacks(execute=True):
            evaluate(0)
        assert sent == [("gpus.tasks.deliver_alert", (only_alert().pk, "fired"), {})]

    def test_webhook_body_is_slack_compatible_and_email_is_sent(self, gpu, settings, monkeypatch):
        settings.ALERT_WEBHOOK_URLS = ["http://hooks.invalid/a"]
        settings.ALERT_EMAILS = ["ops@example.com"]
        posted = []
        monkeypatch.setattr(notify, "post_webhook", lambda url, body: posted.append((url, body)) or 200)
        monkeypatch.setattr(
            dispatch, "publish", lambda name, args, options: getattr(tasks, name.rsplit(".", 1)[-1])(*args)
        )  # run here, not queued
        rule("gpu_used_pct", threshold=50, severity="critical")
        set_used(gpu, 9000)
        evaluate(0)
        tasks.deliver_alert(only_alert().pk, "fired")
        ((url, body),) = posted
        assert url == "http://hooks.invalid/a"
        assert body["text"].startswith("[FIRING] [Critical] gpu_used_pct")
        assert body["alert"]["status"] == "open" and body["alert"]["gpu_id"] == gpu.pk
        assert len(mail.outbox) == 1 and "FIRING" in mail.outbox[0].subject

    def test_a_failing_webhook_is_retried(self, gpu, settings, monkeypatch):
        import requests

        settings.ALERT_WEBHOOK_URLS = ["http://127.0.0.1:9/nothing-listens"]
        rule("gpu_used_pct", threshold=50)
        set_used(gpu, 9000)
        evaluate(0)
        retried = []

        def fake_retry(*args, **kwargs):
            retried.append(kwargs.get("exc"))
            raise RuntimeError("retry scheduled")

        monkeypatch.setattr(tasks.post_alert_webhook, "retry", fake_retry)
        with pytest.raises(RuntimeError, match="retry scheduled"):
            tasks.post_alert_webhook.apply(args=[only_alert().pk, "fired", 0], throw=True)
        assert isinstance(retried[0], requests.RequestException)


def test_default_rules_exist_after_migrate():
    kinds = set(AlertRule.objects.values_list("kind", flat=True))
    assert kinds == {k.value for k in AlertRule.Kind}
