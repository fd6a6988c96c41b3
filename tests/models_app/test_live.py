"""Live GPU figures between the full refreshes (models_app/live.py): the rows and the models' memory follow the
GPUs every GPU_LIVE_SECONDS where the backend is cheap, without history samples, alerts, heartbeats or changes of
availability, and a thread that ticks by itself."""

import json

import psutil
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from gpus import services
from gpus.models import Alert, AlertRule, Gpu, Host, MemorySample
from models_app import live
from models_app.memory import refresh_host_memory, refresh_live
from models_app.models import GpuInstance, ModelConfig
from tests.conftest import FAKE_GPU_UUIDS, HOST_NAME, write_fake_gpu_file
from tests.helpers import grow, running_instance, wait_until

MIB = 1024 * 1024


@pytest.fixture
def tiny_row(db, tiny_model_file):
    return ModelConfig.objects.create(id="tiny", name="Tiny", path=str(tiny_model_file))


def foreign(fake_gpus, used_mib: int, **figures) -> None:
    """Someone else's process of `used_mib` on GPU 0 (and its utilisation, temperature, power)."""
    data = json.loads(fake_gpus.path.read_text())
    data["gpus"][0]["foreign_processes"] = [{"pid": 4242, "name": "train.py", "used_mib": used_mib}]
    data["gpus"][0].update(figures)
    fake_gpus.path.write_text(json.dumps(data))


def test_live_figures_without_history_alerts_or_heartbeat(fake_gpus, tiny_row, child_on_gpus):
    child = child_on_gpus(FAKE_GPU_UUIDS[0])
    instance = running_instance(fake_gpus.host, tiny_row, fake_gpus.gpus[:1], pid=child.pid)
    refresh_host_memory(HOST_NAME)
    samples, seen = MemorySample.objects.count(), Host.objects.get(name=HOST_NAME).last_seen
    rule = AlertRule.objects.create(
        name="any use", kind=AlertRule.Kind.GPU_USED_PCT, threshold=0, notify=False
    )
    before = GpuInstance.objects.get(pk=instance.pk).memory_used_mb

    grow(child)
    foreign(fake_gpus, 900, utilization_pct=55, temperature_c=70, power_w=250)
    sampled = refresh_live(HOST_NAME)

    assert sampled.error == ""
    instance.refresh_from_db()
    assert instance.memory_used_mb >= before + 60 and instance.memory_source == "process"
    assert instance.memory_used_mb == psutil.Process(child.pid).memory_info().rss // MIB
    gpu0 = Gpu.objects.get(pk=fake_gpus.gpus[0].pk)
    assert (gpu0.utilization_pct, gpu0.temperature_c, gpu0.power_w) == (55, 70, 250)
    assert gpu0.updated_at == sampled.taken_at and gpu0.state == "model_loaded"
    assert [p["owner"] for p in gpu0.processes] == ["foreign", "instance"]
    # No history, no heartbeat, no alert (the rule would fire on the full refresh).
    assert MemorySample.objects.count() == samples
    assert Host.objects.get(name=HOST_NAME).last_seen == seen
    assert not Alert.objects.exists()  # nor the default rule's foreign process on a GPU of ours
    refresh_host_memory(HOST_NAME)  # 2 GPUs + 1 instance
    assert MemorySample.objects.count() == samples + 3 and rule.alerts.exists()


def test_a_gpu_that_becomes_busy_changes_state(fake_gpus):
    foreign(fake_gpus, 5000)
    refresh_live(HOST_NAME)
    assert Gpu.objects.get(pk=fake_gpus.gpus[0].pk).state == "occupied_by_others"
    assert Gpu.objects.get(pk=fake_gpus.gpus[1].pk).state == "idle"


def test_availability_stays_the_full_refreshs(fake_gpus):
    """A failed query, a lost host and a GPU the driver no longer reports leave the rows as they are."""
    fake_gpus.write(fail="couldn't communicate with the NVIDIA driver")
    stamp = Gpu.objects.get(pk=fake_gpus.gpus[0].pk).updated_at
    assert "couldn't communicate" in refresh_live(HOST_NAME).error
    assert (
        Gpu.objects.get(pk=fake_gpus.gpus[0].pk).updated_at == stamp
    )  # nothing written, not even "unavailable"

    fake_gpus.write(fail=None)
    services.mark_host_lost(fake_gpus.host, "host testhost not heard from since 12:00:00")
    foreign(fake_gpus, 5000)
    refresh_live(HOST_NAME)
    gpu0 = Gpu.objects.get(pk=fake_gpus.gpus[0].pk)
    assert (gpu0.state, gpu0.unavailable_cause) == ("unavailable", "host_down")
    assert gpu0.memory_used_mib == fake_gpus.gpus[0].memory_used_mib  # the figure from before the silence

    refresh_host_memory(HOST_NAME)  # the host answers: the full refresh makes the GPU available again
    assert Gpu.objects.get(pk=fake_gpus.gpus[0].pk).state == "occupied_by_others"
    data = json.loads(fake_gpus.path.read_text())
    data["gpus"] = data["gpus"][:1]
    fake_gpus.path.write_text(json.dumps(data))
    refresh_live(HOST_NAME)
    assert Gpu.objects.get(pk=fake_gpus.gpus[1].pk).state == "idle"  # not reported: the full refresh says so


def live_queries(count, settings, tmp_path, model, host_name):
    settings.GPU_BACKEND = "fake"
    settings.FAKE_GPUS_FILE = str(write_fake_gpu_file(tmp_path / f"gpus-{count}.json", count))
    host = services.register_host(host_name)
    for gpu in host.gpus.all():
        running_instance(host, model, [gpu])
    refresh_live(host_name)
    with CaptureQueriesContext(connection) as queries:
        assert len(refresh_live(host_name).readings) == count
    assert set(Gpu.objects.filter(host=host).values_list("state", flat=True)) == {"model_loaded"}
    return len([q for q in queries.captured_queries if "SAVEPOINT" not in q["sql"]])


def test_query_count_of_a_live_refresh(db, settings, tmp_path, tiny_row):
    one = live_queries(1, settings, tmp_path, tiny_row, "one-gpu-host")
    GpuInstance.objects.all().delete()
    eight = live_queries(8, settings, tmp_path, tiny_row, "eight-gpu-host")
    # The instances and the host's binaries; the GPU rows read and written; the instances' figures written
    # (and those that stopped meanwhile cleared): whatever the number of GPUs, under the full refresh's 17.
    assert one == eight <= 6, (one, eight)


def test_wanted_only_faster_than_the_full_refresh(settings):
    settings.GPU_REFRESH_SECONDS = 15
    for seconds, wanted in [(0, False), (2, True), (14, True), (15, False)]:
        settings.GPU_LIVE_SECONDS = seconds
        assert live.wanted() is wanted


class TestTick:
    def test_writes_and_keeps_the_live_pace(self, fake_gpus, settings):
        settings.GPU_LIVE_SECONDS, settings.GPU_REFRESH_SECONDS = 2, 15
        thread = live.LiveRefresh(HOST_NAME)
        foreign(fake_gpus, 700)
        assert thread.tick() == 2 and thread.ticks == 1 and thread.skipped is None
        assert Gpu.objects.get(pk=fake_gpus.gpus[0].pk).memory_used_mib >= 700

    def test_nothing_while_the_worker_takes_no_work(self, fake_gpus, settings):
        settings.GPU_LIVE_SECONDS = 2
        thread = live.LiveRefresh(HOST_NAME, may_run=lambda: False)
        foreign(fake_gpus, 700)
        assert thread.tick() == 2 and thread.ticks == 0 and "no heartbeat" in thread.skipped
        assert (
            Gpu.objects.get(pk=fake_gpus.gpus[0].pk).memory_used_mib is None
        )  # as registered: no figure yet

    def test_a_costly_backend_keeps_the_full_refreshs_pace(self, fake_gpus, settings):
        settings.GPU_LIVE_SECONDS, settings.GPU_REFRESH_SECONDS = 2, 15
        settings.GPU_LIVE_BACKENDS = ["nvml"]
        thread = live.LiveRefresh(HOST_NAME)
        assert thread.tick() == 15 and thread.ticks == 0 and "fake backend" in thread.skipped
        settings.GPU_LIVE_BACKENDS = ["nvml", "fake"]
        assert thread.tick() == 2 and thread.ticks == 1 and thread.skipped is None

    def test_a_failing_query_slows_to_the_full_refreshs_pace(self, fake_gpus, settings):
        settings.GPU_LIVE_SECONDS, settings.GPU_REFRESH_SECONDS = 2, 15
        thread = live.LiveRefresh(HOST_NAME)
        fake_gpus.write(fail="GPU is lost")
        assert thread.tick() == 15 and "GPU is lost" in thread.skipped
        fake_gpus.write(fail=None)
        assert thread.tick() == 2


@pytest.mark.django_db(transaction=True)
def test_the_thread_follows_a_model_that_grows(fake_gpus, tiny_row, child_on_gpus, settings):
    settings.GPU_LIVE_SECONDS, settings.GPU_REFRESH_SECONDS = 1, 15
    child = child_on_gpus(FAKE_GPU_UUIDS[0])
    instance = running_instance(fake_gpus.host, tiny_row, fake_gpus.gpus[:1], pid=child.pid)
    refresh_host_memory(HOST_NAME)
    before = GpuInstance.objects.get(pk=instance.pk).memory_used_mb
    thread = live.LiveRefresh(HOST_NAME)
    thread.start()
    try:
        grow(child)
        grown_at = timezone.now()
        figure = wait_until(
            lambda: (i := GpuInstance.objects.get(pk=instance.pk)).memory_updated_at > grown_at and i,
            timeout=10,
            what="a live figure after the growth",
        )
        assert figure.memory_used_mb >= before + 60
        # the next tick's sample: within one live interval, with room for a loaded machine
        assert (figure.memory_updated_at - grown_at).total_seconds() < 4
    finally:
        thread.stop()
        thread.join(5)
    assert not thread.is_alive() and thread.ticks >= 1
