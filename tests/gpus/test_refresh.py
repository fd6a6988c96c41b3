"""One refresh cycle: GPU states, attribution of memory to instances, samples, faults, query counts."""

import json
import logging
import time
from datetime import timedelta

import psutil
import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from gpus import services
from gpus.models import Gpu, MemorySample
from gpus.telemetry import GpuProcess, GpuReading
from models_app.memory import refresh_host_memory
from models_app.models import GpuInstance, ModelConfig
from tests.conftest import FAKE_GPU_UUIDS, HOST_NAME, write_fake_gpu_file
from tests.helpers import grow, running_instance

MIB = 1024 * 1024


def reading(pk_uuid, used=1000, total=8000, processes=()):
    return GpuReading(0, pk_uuid, "GPU", total, used, None, tuple(processes))


class TestAttribution:
    def claim(self, pks, pids):
        return services.InstanceClaim(instance_id=7, gpu_pks=tuple(pks), pids=frozenset(pids))

    def test_per_process_figure_of_the_whole_process_tree(self):
        readings = {
            1: reading("a", processes=[GpuProcess(10, "llama-server", 300), GpuProcess(11, "child", 20)]),
        }
        figure = services.attribute(self.claim([1], {10, 11}), readings, "now")
        assert (figure.used_mib, figure.total_mib, figure.source) == (320, 8000, "process")

    def test_multi_gpu_sums_used_and_total(self):
        readings = {
            1: reading(
                "a", total=8000, processes=[GpuProcess(10, "llama-server", 300), GpuProcess(99, "x", 5000)]
            ),
            2: reading("b", total=16000, processes=[GpuProcess(10, "llama-server", 200)]),
        }
        figure = services.attribute(self.claim([1, 2], {10}), readings, "now")
        assert (figure.used_mib, figure.total_mib, figure.source) == (500, 24000, "process")

    def test_no_per_process_figure_falls_back_to_the_whole_device(self):
        readings = {
            1: reading("a", used=1500, processes=[GpuProcess(10, "llama-server", None)]),
            2: reading("b", used=700, processes=[]),
        }
        figure = services.attribute(self.claim([1, 2], {10}), readings, "now")
        assert (figure.used_mib, figure.total_mib, figure.source) == (2200, 16000, "device")

    def test_pids_the_driver_does_not_show_fall_back_to_the_device(self):
        readings = {1: reading("a", used=900, processes=[GpuProcess(123456, "?", 800)])}
        figure = services.attribute(self.claim([1], {10}), readings, "now")
        assert figure.source == "device" and figure.used_mib == 900

    def test_a_vanished_gpu_gives_no_figure(self):
        figure = services.attribute(self.claim([1, 2], {10}), {1: reading("a")}, "now")
        assert figure.source == "none" and figure.used_mib is None


@pytest.fixture
def tiny_row(db, tiny_model_file):
    return ModelConfig.objects.create(id="tiny", name="Tiny", path=str(tiny_model_file))


def test_refresh_attributes_real_process_memory_and_sets_states(fake_gpus, tiny_row, child_on_gpus):
    child = child_on_gpus(FAKE_GPU_UUIDS[0])
    instance = running_instance(fake_gpus.host, tiny_row, fake_gpus.gpus[:1], pid=child.pid)

    refresh_host_memory(HOST_NAME)

    instance.refresh_from_db()
    rss_mib = psutil.Process(child.pid).memory_info().rss // MIB
    assert instance.memory_source == "process"
    assert abs(instance.memory_used_mb - rss_mib) <= 2
    assert instance.memory_total_mb == 24564
    assert instance.memory_updated_at is not None
    gpu0, gpu1 = Gpu.objects.order_by("index")
    assert gpu0.state == "model_loaded" and gpu1.state == "idle"
    assert gpu0.processes == [
        {"pid": child.pid, "name": "python3" if "python3" in gpu0.processes[0]["name"] else gpu0.processes[0]["name"],
         "used_mib": gpu0.processes[0]["used_mib"], "owner": "instance", "instance_id": instance.pk}
    ]  # fmt: skip
    # One sample per GPU and one per running instance.
    assert MemorySample.objects.filter(gpu__isnull=False).count() == 2
    assert MemorySample.objects.get(instance_id=instance.pk).used_mib == instance.memory_used_mb


def test_memory_growth_shows_after_the_next_refresh(fake_gpus, tiny_row, child_on_gpus):
    child = child_on_gpus(f"{FAKE_GPU_UUIDS[0]},{FAKE_GPU_UUIDS[1]}")
    instance = running_instance(fake_gpus.host, tiny_row, fake_gpus.gpus, pid=child.pid)
    refresh_host_memory(HOST_NAME)
    instance.refresh_from_db()
    before = instance.memory_used_mb
    assert instance.memory_total_mb == 2 * 24564

    grow(child)
    grow(child)
    refresh_host_memory(HOST_NAME)
    instance.refresh_from_db()
    assert instance.memory_used_mb >= before + 120, (before, instance.memory_used_mb)


def test_occupied_by_others_lists_foreign_processes(fake_gpus):
    data = json.loads(fake_gpus.path.read_text())
    data["gpus"][1]["foreign_processes"] = [
        {"pid": 4242, "name": "someone-elses-training.py", "used_mib": 9000}
    ]
    fake_gpus.path.write_text(json.dumps(data))

    refresh_host_memory(HOST_NAME)

    gpu1 = Gpu.objects.get(index=1)
    assert gpu1.state == "occupied_by_others"
    assert (
        gpu1.processes[0]["owner"] == "foreign" and gpu1.processes[0]["name"] == "someone-elses-training.py"
    )
    assert "someone-elses-training.py" in gpu1.state_reason
    assert Gpu.objects.get(index=0).state == "idle"


def test_a_process_named_llama_server_is_not_an_orphan_by_its_name(fake_gpus):
    """Only one running the host's own llama-server binaries is (tests/gpus/test_kill_orphan.py)."""
    data = json.loads(fake_gpus.path.read_text())
    data["gpus"][0]["foreign_processes"] = [{"pid": 5151, "name": "llama-server", "used_mib": 500}]
    fake_gpus.path.write_text(json.dumps(data))
    refresh_host_memory(HOST_NAME)
    assert Gpu.objects.get(index=0).processes[0]["owner"] == "foreign"


def test_failing_driver_marks_gpus_unavailable_keeps_last_figures_and_recovers(
    fake_gpus, tiny_row, child_on_gpus, caplog
):
    child = child_on_gpus(FAKE_GPU_UUIDS[0])
    instance = running_instance(fake_gpus.host, tiny_row, fake_gpus.gpus[:1], pid=child.pid)
    refresh_host_memory(HOST_NAME)
    instance.refresh_from_db()
    last = (instance.memory_used_mb, instance.memory_total_mb, instance.memory_updated_at)

    fake_gpus.write(fail="NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver")
    with caplog.at_level(logging.WARNING, logger="gpus.services"):
        refresh_host_memory(HOST_NAME)
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 1
    assert set(Gpu.objects.values_list("state", flat=True)) == {"unavailable"}
    assert "couldn't communicate" in Gpu.objects.first().state_reason
    instance.refresh_from_db()
    assert instance.memory_source == "none"
    assert (instance.memory_used_mb, instance.memory_total_mb, instance.memory_updated_at) == last
    assert instance.memory_percent is None  # the UI shows N/A

    fake_gpus.write(fail=None)
    refresh_host_memory(HOST_NAME)
    instance.refresh_from_db()
    assert instance.memory_source == "process" and instance.memory_updated_at > last[2]
    assert Gpu.objects.get(index=0).state == "model_loaded"


def test_hanging_driver_times_out_and_recovers(fake_gpus, settings):
    settings.GPU_QUERY_TIMEOUT = 1
    fake_gpus.write(hang_seconds=10)
    started = time.monotonic()
    refresh_host_memory(HOST_NAME)
    assert time.monotonic() - started < 5
    gpu = Gpu.objects.first()
    assert gpu.state == "unavailable" and "timed out" in gpu.state_reason
    fake_gpus.write(hang_seconds=0)
    refresh_host_memory(HOST_NAME)
    assert set(Gpu.objects.values_list("state", flat=True)) == {"idle"}


def test_a_vanished_gpu_is_marked_never_deleted(fake_gpus):
    data = json.loads(fake_gpus.path.read_text())
    data["gpus"] = data["gpus"][:1]
    fake_gpus.path.write_text(json.dumps(data))
    refresh_host_memory(HOST_NAME)
    assert Gpu.objects.count() == 2
    assert Gpu.objects.get(index=1).state == "unavailable"


def queries_for_one_refresh(count, settings, tmp_path, model, host_name):
    path = write_fake_gpu_file(tmp_path / f"gpus-{count}.json", count)
    settings.FAKE_GPUS_FILE = str(path)
    host = services.register_host(host_name)
    for gpu in host.gpus.all():
        running_instance(host, model, [gpu])
    refresh_host_memory(host_name)  # warm: inventory created
    with CaptureQueriesContext(connection) as queries:
        refresh_host_memory(host_name)
    # The cycle's transaction shows up as a savepoint here (the test runs inside a transaction).
    return len([q for q in queries.captured_queries if "SAVEPOINT" not in q["sql"]])


def test_query_count_does_not_grow_with_gpus_and_instances(db, settings, tmp_path, tiny_row):
    settings.GPU_BACKEND = "fake"
    one = queries_for_one_refresh(1, settings, tmp_path, tiny_row, "one-gpu-host")
    GpuInstance.objects.all().delete()
    from gpus.models import Host

    Host.objects.all().delete()
    eight = queries_for_one_refresh(8, settings, tmp_path, tiny_row, "eight-gpu-host")
    assert one == eight
    # 7 for the refresh itself (the host's llama-server binaries among them); the rest is the alert
    # evaluation right after it (rules, live alerts, the host's GPUs, instance facts, the leak window's
    # samples, the instances evicted lately for the eviction rule), also fixed whatever the number of GPUs.
    assert eight <= 17


def test_prune_deletes_old_samples_in_batches(fake_gpus):
    gpu = fake_gpus.gpus[0]
    old = timezone.now() - timedelta(days=31)
    MemorySample.objects.bulk_create(
        [MemorySample(gpu=gpu, taken_at=old, used_mib=1, total_mib=2) for _ in range(25)]
        + [MemorySample(gpu=gpu, taken_at=timezone.now(), used_mib=1, total_mib=2) for _ in range(3)]
    )
    assert services.prune_samples(batch_size=10) == 25
    assert MemorySample.objects.count() == 3
