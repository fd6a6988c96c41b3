"""/metrics parsed by prometheus-client's own parser; who may scrape it; the history pages, the alerts page and
banner, and the per-GPU / per-process breakdown on a multi-GPU instance's card."""

from datetime import timedelta

import pytest
from django.utils import timezone
from prometheus_client.parser import text_string_to_metric_families

from accounts.models import ApiToken
from gpus.models import Alert, AlertRule, Gpu, Host, MemorySample
from tests.api.factories import make_gpus, make_instance

pytestmark = pytest.mark.django_db


@pytest.fixture
def world(users, tiny_model):
    gpus = make_gpus(3)
    Host.objects.update(last_seen=timezone.now())  # its worker's heartbeat: up
    instance = make_instance(gpus[:2], tiny_model, owner=users["operator"], memory_used_mb=8200)
    for gpu, (ours, theirs) in zip(gpus[:2], [(4200, 3000), (4000, None)], strict=True):
        procs = [{"pid": 100 + gpu.index, "name": "llama-server", "used_mib": ours, "owner": "instance",
                  "instance_id": instance.pk}]  # fmt: skip
        if theirs:
            procs.append(
                {"pid": 999, "name": "train.py", "used_mib": theirs, "owner": "foreign", "instance_id": None}
            )
        Gpu.objects.filter(pk=gpu.pk).update(
            processes=procs, memory_used_mib=ours + (theirs or 0), utilization_pct=40
        )
    rule = AlertRule.objects.get(kind="foreign_process")
    now = timezone.now()
    alert = Alert.objects.create(
        rule=rule, subject=f"gpu:{gpus[0].pk}", gpu=gpus[0], host=gpus[0].host, status="open", started_at=now,
        fired_at=now, message="GPU 0 serves one of our models and also runs: train.py",
    )  # fmt: skip
    MemorySample.objects.bulk_create(
        MemorySample(instance_id=instance.pk, taken_at=now - timedelta(minutes=m), used_mib=8000 + m)
        for m in range(20)
    )
    return {"gpus": gpus, "instance": instance, "alert": alert}


@pytest.fixture
def bearer():
    def make(user):
        return f"Bearer {ApiToken.issue(user, 'metrics')[1]}"

    return make


def families(text):
    return {f.name: f for f in text_string_to_metric_families(text)}


class TestMetrics:
    def test_parsed_by_prometheus_clients_parser(self, client, users, world, bearer):
        response = client.get("/metrics", HTTP_AUTHORIZATION=bearer(users["viewer"]))
        assert response.status_code == 200
        assert response["Content-Type"].startswith("text/plain")
        found = families(response.content.decode())
        used = {s.labels["gpu"]: s.value for s in found["DCGM_FI_DEV_FB_USED"].samples}
        assert used == {"0": 7200, "1": 4000, "2": 10}
        total = found["DCGM_FI_DEV_FB_TOTAL"].samples[0]
        assert total.value == 24564 and total.labels["Hostname"] == "testhost" and total.labels["UUID"]
        assert {s.value for s in found["DCGM_FI_DEV_GPU_UTIL"].samples} >= {40}
        (inst,) = found["llamacontroller_instance_memory_used_bytes"].samples
        assert inst.labels == {"instance_id": str(world["instance"].pk), "model": "tiny", "host": "testhost",
                               "gpus": "0,1", "source": "process"}  # fmt: skip
        assert inst.value == 8200 * 1024 * 1024
        per_gpu = {
            s.labels["gpu"]: s.value for s in found["llamacontroller_instance_gpu_memory_used_bytes"].samples
        }
        assert per_gpu == {"0": 4200 * 1024 * 1024, "1": 4000 * 1024 * 1024}
        owners = {s.labels["owner"] for s in found["llamacontroller_gpu_process_memory_used_bytes"].samples}
        assert owners == {"instance", "foreign"}
        running = [s for s in found["llamacontroller_instance_status"].samples if s.value == 1]
        assert [s.labels["status"] for s in running] == ["running"]
        alerts = {s.labels["kind"]: s.value for s in found["llamacontroller_alerts_open"].samples}
        assert alerts["foreign_process"] == 1 and alerts["gpu_used_pct"] == 0
        assert [(s.labels, s.value) for s in found["llamacontroller_host_up"].samples] == [
            ({"host": "testhost"}, 1)
        ]

    def test_a_down_host_scrapes_as_zero(self, client, users, world, bearer):
        Host.objects.update(last_seen=timezone.now() - timedelta(hours=1))
        found = families(client.get("/metrics", HTTP_AUTHORIZATION=bearer(users["viewer"])).content.decode())
        assert [s.value for s in found["llamacontroller_host_up"].samples] == [0]
        (beat,) = found["llamacontroller_host_last_heartbeat_seconds"].samples
        assert abs(beat.value - (timezone.now() - timedelta(hours=1)).timestamp()) < 5

    def test_needs_a_token_or_an_allowed_address(self, client, users, world, bearer, settings):
        assert client.get("/metrics").status_code == 401
        assert client.get("/metrics", HTTP_AUTHORIZATION="Bearer lc_nope").status_code == 401
        assert client.get("/metrics", HTTP_AUTHORIZATION=bearer(users["outsider"])).status_code == 403
        settings.METRICS_ALLOWED_ADDRESSES = ["10.0.0.0/8"]
        assert client.get("/metrics", REMOTE_ADDR="10.1.2.3").status_code == 200
        assert client.get("/metrics", REMOTE_ADDR="192.168.1.1").status_code == 401

    def test_scrape_costs_a_fixed_number_of_queries(
        self, client, users, world, bearer, django_assert_max_num_queries
    ):
        header = bearer(users["viewer"])
        client.get("/metrics", HTTP_AUTHORIZATION=header)
        with django_assert_max_num_queries(10):
            client.get("/metrics", HTTP_AUTHORIZATION=header)


class TestPages:
    def test_dashboard_shows_the_banner_and_the_breakdown(self, client, users, world):
        client.force_login(users["viewer"])
        html = client.get("/").content.decode()
        assert 'id="alerts-banner"' in html and "train.py" in html
        assert "GPU 0: 4.1 GiB" in html and "GPU 1: 3.9 GiB" in html
        # Every GPU card lists its processes with their owner: ours (with the instance), foreign, orphan.
        assert f"ours #{world['instance'].pk}" in html and 'class="badge badge-foreign">foreign<' in html
        assert f'href="/instances/{world["instance"].pk}/history/"' in html
        assert f'href="/gpus/{world["gpus"][0].pk}/history/"' in html

    def test_history_page_without_javascript_has_figures_and_a_table(self, client, users, world):
        client.force_login(users["viewer"])
        response = client.get(f"/instances/{world['instance'].pk}/history/?window=1h")
        html = response.content.decode()
        assert response.status_code == 200
        assert 'peak <strong class="peak">7.8 GiB</strong>' in html
        assert 'id="history-data"' in html and "uPlot.iife.min.js" in html and "<table" in html
        assert client.get(f"/gpus/{world['gpus'][0].pk}/history/?window=7d").status_code == 200
        assert client.get(f"/gpus/{world['gpus'][0].pk}/history/?window=9y").status_code == 404

    def test_acknowledge_from_the_alerts_page(self, client, users, world):
        client.force_login(users["viewer"])
        assert "Acknowledge" not in client.get("/alerts/").content.decode()
        assert client.post(f"/alerts/{world['alert'].pk}/acknowledge/").status_code == 403
        client.force_login(users["operator"])
        assert "Acknowledge" in client.get("/alerts/").content.decode()
        response = client.post(f"/alerts/{world['alert'].pk}/acknowledge/", {"next": "https://evil.example/"})
        assert response.status_code == 302 and response["Location"] == "/alerts/"
        world["alert"].refresh_from_db()
        assert world["alert"].acknowledged_by == "operator"

    def test_vendored_uplot_is_served_locally(self, client):
        response = client.get("/static/vendor/uplot/uPlot.iife.min.js")
        assert response.status_code == 200
