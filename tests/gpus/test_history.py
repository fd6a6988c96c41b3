"""Memory history downsampled in the database (SQLite here; PostgreSQL when DATABASE_URL names one), the
history endpoints, and the alert rules and alerts API."""

from datetime import UTC, datetime, timedelta

import pytest
from django.utils import timezone

from gpus import history
from gpus.models import Alert, AlertRule, MemorySample
from models_app.events import record
from models_app.models import InstanceEvent
from tests.api.factories import make_gpus, make_instance

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 1, 15, 12, 0, 7, tzinfo=UTC)


def span(window="1h", resolution=None):
    return history.parse_span(window, resolution, now=NOW)


class TestSpan:
    def test_auto_resolution_keeps_at_most_500_points(self):
        assert (span("1h").resolution, span("24h").resolution, span("7d").resolution) == (15, 300, 1800)
        for window, seconds in history.WINDOWS.items():
            assert seconds / span(window).resolution <= history.MAX_POINTS

    def test_start_is_a_whole_bucket(self):
        s = span("24h")
        assert int(s.start.timestamp()) % 300 == 0 and s.end == NOW
        assert NOW - s.start >= timedelta(hours=24)

    @pytest.mark.parametrize(
        "window, resolution, field",
        [("2h", None, "window"), ("1h", "abc", "resolution"), ("1h", "-5", "resolution"),
         ("7d", "60", "resolution"), ("1h", "7200", "resolution"), ("1h", "٣٠", "resolution")],
    )  # fmt: skip
    def test_bad_values_name_the_field(self, window, resolution, field):
        with pytest.raises(history.HistoryError) as caught:
            history.parse_span(window, resolution, now=NOW)
        assert caught.value.field == field


class TestDownsample:
    def test_bucketed_max_and_mean(self):
        (gpu,) = make_gpus(1)
        base = span("1h", "60").start
        samples = [(0, 100), (15, 200), (30, 300), (45, 400), (60, 1000), (75, 2000), (200, None)]
        MemorySample.objects.bulk_create(
            MemorySample(gpu=gpu, taken_at=base + timedelta(seconds=s), used_mib=u, total_mib=24564)
            for s, u in samples
        )
        MemorySample.objects.create(gpu=gpu, taken_at=base - timedelta(seconds=1), used_mib=99999)  # before
        points = history.gpu_series(gpu.pk, span("1h", "60"))
        t0 = int(base.timestamp())
        assert points == [
            {"t": t0, "max_mib": 400, "mean_mib": 250.0, "total_mib": 24564},
            {"t": t0 + 60, "max_mib": 2000, "mean_mib": 1500.0, "total_mib": 24564},
            {"t": t0 + 180, "max_mib": None, "mean_mib": None, "total_mib": 24564},
        ]

    def test_seven_days_of_15_second_samples_give_at_most_500_points(self):
        (gpu,) = make_gpus(1)
        s = span("7d")
        count = 7 * 24 * 240
        MemorySample.objects.bulk_create(
            (
                MemorySample(instance_id=77, taken_at=s.start + timedelta(seconds=15 * i), used_mib=i % 100)
                for i in range(count)
            ),
            batch_size=5000,
        )
        points = history.instance_series(77, s)
        assert 300 <= len(points) <= history.MAX_POINTS
        assert all(p["max_mib"] == 99 for p in points[1:-1])
        assert sum(1 for _ in points) == len({p["t"] for p in points})


@pytest.fixture
def world(users, tiny_model):
    gpus = make_gpus(2)
    instance = make_instance(gpus, tiny_model, owner=users["operator"])
    now = timezone.now()
    MemorySample.objects.bulk_create(
        [MemorySample(gpu=gpus[0], taken_at=now - timedelta(minutes=m), used_mib=1000 + m) for m in range(30)]
        + [
            MemorySample(instance_id=instance.pk, taken_at=now - timedelta(minutes=m), used_mib=500)
            for m in range(30)
        ]
    )
    record(InstanceEvent.Kind.HEALTHY, instance=instance, detail="loaded")
    rule = AlertRule.objects.get(kind="gpu_used_pct")
    Alert.objects.create(
        rule=rule, subject=f"gpu:{gpus[0].pk}", gpu=gpus[0], host=gpus[0].host, instance_id=instance.pk,
        status="open", started_at=now, fired_at=now, message="GPU 0 at 95%",
    )  # fmt: skip
    return {"gpus": gpus, "instance": instance, "rule": rule}


class TestHistoryApi:
    def test_gpu_history_with_events(self, client, users, world):
        client.force_login(users["viewer"])
        gpu = world["gpus"][0]
        body = client.get(f"/api/v1/gpus/{gpu.pk}/history/?window=1h").json()
        assert body["subject"] == f"gpu:{gpu.pk}" and body["resolution"] == 15 and body["total_mib"] == 24564
        assert 25 <= len(body["points"]) <= 30
        kinds = [e["kind"] for e in body["events"]]
        assert "loaded" in kinds and "alert_fired" in kinds
        assert body["summary"]["peak_mib"] == 1029

    def test_instance_history(self, client, users, world):
        client.force_login(users["viewer"])
        instance = world["instance"]
        body = client.get(f"/api/v1/instances/{instance.pk}/history/?window=24h&resolution=600").json()
        assert body["resolution"] == 600 and {p["max_mib"] for p in body["points"]} == {500}
        assert "Tiny test llama" in body["label"]
        assert body["estimate_mib"] is None  # loaded without a stored estimate
        type(instance).objects.filter(pk=instance.pk).update(memory_estimated_mb=812)
        body = client.get(f"/api/v1/instances/{instance.pk}/history/?window=24h&resolution=600").json()
        assert body["estimate_mib"] == 812  # the estimate stored at load time

    @pytest.mark.parametrize("query, field", [("window=3d", "window"), ("resolution=1", "resolution")])
    def test_bad_values_answer_400_naming_the_field(self, client, users, world, query, field):
        client.force_login(users["viewer"])
        response = client.get(f"/api/v1/gpus/{world['gpus'][0].pk}/history/?{query}")
        assert response.status_code == 400 and field in response.json()

    def test_who_may_read(self, client, users, world):
        url = f"/api/v1/instances/{world['instance'].pk}/history/"
        assert client.get(url).status_code in (401, 403)
        client.force_login(users["outsider"])
        assert client.get(url).status_code == 403
        client.force_login(users["viewer"])
        assert client.get("/api/v1/instances/999999/history/").status_code == 404


class TestAlertApi:
    def test_rules_are_read_by_viewers_and_changed_by_admins(self, client, users):
        client.force_login(users["viewer"])
        assert (
            len(client.get("/api/v1/alert-rules/").json()["results"]) == 7
        )  # the default rules, one per kind
        new = {"name": "GPU 80", "kind": "gpu_used_pct", "threshold": 80, "for_minutes": 1}
        assert client.post("/api/v1/alert-rules/", new, content_type="application/json").status_code == 403
        client.force_login(users["admin"])
        response = client.post("/api/v1/alert-rules/", new, content_type="application/json")
        assert response.status_code == 201, response.content
        bad = {**new, "name": "too much", "threshold": 150}
        response = client.post("/api/v1/alert-rules/", bad, content_type="application/json")
        assert response.status_code == 400 and "threshold" in response.json()

    def test_alerts_list_filter_and_acknowledge(self, client, users, world):
        client.force_login(users["viewer"])
        (alert,) = client.get("/api/v1/alerts/?status=open").json()["results"]
        assert alert["rule_name"] == world["rule"].name and alert["acknowledged_at"] is None
        assert client.get("/api/v1/alerts/?status=nope").status_code == 400
        assert client.post(f"/api/v1/alerts/{alert['id']}/acknowledge/").status_code == 403
        client.force_login(users["operator"])
        body = client.post(f"/api/v1/alerts/{alert['id']}/acknowledge/").json()
        assert body["acknowledged_by"] == "operator" and body["status"] == "open"
