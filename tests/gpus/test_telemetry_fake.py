"""Fake backend with REAL child processes selecting simulated GPUs via CUDA_VISIBLE_DEVICES."""

import json
import os
import subprocess
import sys
import time

import pytest

from gpus.telemetry import GpuReading, TelemetryError, get_backend, process_tree_pids, sample_with_timeout
from gpus.telemetry.fake import FakeBackend, simulated_load
from tests.conftest import FAKE_GPU_UUIDS

UUID0 = FAKE_GPU_UUIDS[0]  # this run's own (tests/conftest.py)
UUID1 = "GPU-11111111-fake-1111-1111-111111111111"

# Allocates 50 MiB, says so, then allocates 100 MiB more for each line read from stdin.
CHILD = """
import sys
blocks = [bytearray(50 * 1024 * 1024)]
print("ready", flush=True)
for line in sys.stdin:
    blocks.append(bytearray(100 * 1024 * 1024))
    print("ready", flush=True)
"""


def gpus_config(**extra):
    config = {
        "gpus": [
            {
                "index": 0,
                "uuid": UUID0,
                "name": "Simulated RTX 4090",
                "memory_total_mib": 24564,
                "baseline_used_mib": 250,
                "foreign_processes": [{"pid": 4242, "name": "someone-elses-training.py", "used_mib": 9000}],
            },
            {"index": 1, "uuid": UUID1, "name": "Simulated RTX 4090", "memory_total_mib": 24564},
        ]
    }
    config.update(extra)
    return config


@pytest.fixture
def gpus_file(tmp_path):
    path = tmp_path / "fake-gpus.json"

    def write(config):
        path.write_text(json.dumps(config))
        return str(path)

    write(gpus_config())
    return write


@pytest.fixture
def spawn():
    children = []

    def start(cuda_visible_devices):
        env = {**os.environ, "CUDA_VISIBLE_DEVICES": cuda_visible_devices}
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        children.append(child)
        assert child.stdout.readline().strip() == "ready"
        return child

    yield start
    for child in children:
        child.kill()
        child.wait(timeout=10)


def ours(reading, pid):
    return [p for p in reading.processes if p.pid == pid]


def test_child_by_uuid_appears_on_that_gpu(gpus_file, spawn):
    child = spawn(UUID0)
    backend = get_backend("fake", fake_gpus_path=gpus_file(gpus_config()))
    gpu0, gpu1 = backend.sample()
    assert isinstance(gpu0, GpuReading) and gpu0.simulated and gpu0.utilization_pct is None
    (proc,) = ours(gpu0, child.pid)
    assert proc.used_mib > 40
    assert proc.name.startswith("python")
    assert ours(gpu1, child.pid) == []
    foreign = [p for p in gpu0.processes if p.pid == 4242]
    assert foreign[0].name == "someone-elses-training.py" and foreign[0].used_mib == 9000
    assert gpu0.memory_used_mib == 250 + 9000 + sum(p.used_mib for p in gpu0.processes if p.pid != 4242)


def test_child_split_over_two_gpus(gpus_file, spawn):
    child = spawn(f"{UUID0},{UUID1}")
    backend = FakeBackend(gpus_file(gpus_config()))
    gpu0, gpu1 = backend.sample()
    (on0,) = ours(gpu0, child.pid)
    (on1,) = ours(gpu1, child.pid)
    assert on0.used_mib == on1.used_mib
    assert 20 < on0.used_mib < 50  # about half of 50+ MiB


def test_index_match_and_memory_growth(gpus_file, spawn):
    child = spawn("1")
    backend = FakeBackend(gpus_file(gpus_config()))
    (before,) = ours(backend.sample()[1], child.pid)
    child.stdin.write("more\n")
    child.stdin.flush()
    assert child.stdout.readline().strip() == "ready"
    (after,) = ours(backend.sample()[1], child.pid)
    assert after.used_mib >= before.used_mib + 90


NONE = {"utilization_pct": None, "temperature_c": None, "power_w": None}


def test_simulated_load_figures():
    """Half a core over the interval: 50 %, halfway from 30 to 80 °C and from 25 W to the power limit."""
    assert simulated_load(1.0, 2.0, None, NONE) == {
        "utilization_pct": 50,
        "temperature_c": 55,
        "power_w": 238,
    }
    assert simulated_load(4.0, 1.0, 300, NONE) == {
        "utilization_pct": 100,
        "temperature_c": 80,
        "power_w": 300,
    }
    assert simulated_load(0.0, 0.0, None, NONE) == {"utilization_pct": 0, "temperature_c": 30, "power_w": 25}
    given = {"utilization_pct": 20, "temperature_c": None, "power_w": 99}  # the file's figures win
    assert simulated_load(9.0, 1.0, None, given) == {
        "utilization_pct": 20,
        "temperature_c": 40,
        "power_w": 99,
    }


def test_simulate_load_follows_the_cpu_use_of_the_gpus_processes(gpus_file):
    """Opt-in per GPU ("simulate_load": true, as the run command's simulated GPUs have): a process spinning on
    GPU 0 makes it busy, warm and power-hungry; GPU 1, with nothing on it, idles; without the key: "—"."""
    config = gpus_config()
    for gpu in config["gpus"]:
        gpu["simulate_load"] = True
    backend = FakeBackend(gpus_file(config))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": UUID0}
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"], env=env)
    try:
        deadline = time.monotonic() + 10
        backend.sample()
        while True:  # the first sample of a process has no interval yet; a loaded machine gives it little CPU
            time.sleep(0.3)
            gpu0, gpu1 = backend.sample()
            if (
                any(p.pid == spinner.pid for p in gpu0.processes)
                and gpu0.utilization_pct
                or time.monotonic() > deadline
            ):
                break
    finally:
        spinner.kill()
        spinner.wait()
    assert 0 < gpu0.utilization_pct <= 100
    assert gpu0.temperature_c == round(30 + 50 * gpu0.utilization_pct / 100) > 30
    assert gpu0.power_w == round(25 + 425 * gpu0.utilization_pct / 100) > 25
    assert (gpu1.utilization_pct, gpu1.temperature_c, gpu1.power_w) == (0, 30, 25)
    plain = FakeBackend(gpus_file(gpus_config())).sample()[0]
    assert (plain.utilization_pct, plain.temperature_c, plain.power_w) == (None, None, None)


def test_used_memory_capped_at_total(gpus_file):
    config = gpus_config()
    config["gpus"][1]["foreign_processes"] = [{"pid": None, "name": "hog", "used_mib": 10**6}]
    gpu1 = FakeBackend(gpus_file(config)).sample()[1]
    assert gpu1.memory_used_mib == gpu1.memory_total_mib == 24564


def test_fail_field_injected_at_run_time(gpus_file):
    path = gpus_file(gpus_config())
    backend = FakeBackend(path)
    assert len(backend.sample()) == 2
    gpus_file(gpus_config(fail="NVML: GPU is lost"))
    with pytest.raises(TelemetryError, match="NVML: GPU is lost"):
        backend.sample()


def test_hang_seconds_and_timeout(gpus_file):
    backend = FakeBackend(gpus_file(gpus_config(hang_seconds=2)))
    start = time.monotonic()
    with pytest.raises(TelemetryError, match=r"GPU query timed out after 0.3s"):
        sample_with_timeout(backend, 0.3)
    assert time.monotonic() - start < 1.5


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "not found"),
        ("{not json", "invalid JSON"),
        ("[]", '"gpus" list'),
        (json.dumps({"gpus": [{"index": 0, "uuid": "x", "name": "n"}]}), r"gpus\[0\]\.memory_total_mib"),
        (
            json.dumps({"gpus": [{"index": "0", "uuid": "x", "name": "n", "memory_total_mib": 1}]}),
            r"gpus\[0\]\.index",
        ),
        (
            json.dumps(
                {
                    "gpus": [
                        {
                            "index": 0,
                            "uuid": "x",
                            "name": "n",
                            "memory_total_mib": 1,
                            "foreign_processes": [{"pid": "abc"}],
                        }
                    ]
                }
            ),
            r"gpus\[0\]\.foreign_processes\[0\]\.pid",
        ),
        (json.dumps({"gpus": [], "hang_seconds": "x"}), "hang_seconds"),
        (
            json.dumps(
                {"gpus": [{"index": 0, "uuid": "x", "name": "n", "memory_total_mib": 1, "simulate_load": 1}]}
            ),
            r"gpus\[0\]\.simulate_load must be true or false",
        ),
    ],
)
def test_bad_files(tmp_path, content, message):
    path = tmp_path / "gpus.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(TelemetryError, match=message) as info:
        FakeBackend(str(path))
    assert str(path) in str(info.value)


def test_file_broken_after_start(gpus_file):
    path = gpus_file(gpus_config())
    backend = FakeBackend(path)
    with open(path, "w") as f:
        f.write("{")
    with pytest.raises(TelemetryError, match="invalid JSON"):
        backend.sample()


def test_get_backend_fake_needs_path_and_unknown_name():
    with pytest.raises(TelemetryError, match="fake"):
        get_backend("fake")
    with pytest.raises(ValueError):
        get_backend("cuda")


def test_sample_with_timeout_wraps_other_exceptions():
    class Broken:
        name = "broken"

        def sample(self):
            raise KeyError("boom")

        def close(self):
            pass

    with pytest.raises(TelemetryError, match="KeyError"):
        sample_with_timeout(Broken(), 5)


def test_process_tree_pids(spawn):
    child = spawn("")
    assert process_tree_pids(os.getpid()) >= {os.getpid(), child.pid}
    child.kill()
    child.wait()
    assert process_tree_pids(child.pid) == set()


def test_process_trees_match_psutil_for_a_real_tree():
    import subprocess
    import sys

    from gpus.telemetry import process_tree_pids, process_trees

    code = "import subprocess,sys,time; c=subprocess.Popen(['sleep','30']); print('ok',flush=True); time.sleep(30)"
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "ok"
        trees = process_trees([parent.pid, 999_999_999])
        assert trees[parent.pid] == process_tree_pids(parent.pid)
        assert len(trees[parent.pid]) == 2
        assert trees[999_999_999] == set()
    finally:
        for pid in process_tree_pids(parent.pid) - {parent.pid}:
            os.kill(pid, 9)
        parent.kill()
        parent.wait()
