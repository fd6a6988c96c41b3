"""nvidia-smi backend against the fake nvidia-smi in tests/fixtures/nvidia-smi (recorded outputs)."""

import os
from pathlib import Path

import pytest

from gpus.telemetry import TelemetryError, get_backend
from gpus.telemetry.nvidia_smi import NvidiaSmiBackend, parse_apps, parse_gpus

FAKE_SMI_DIR = Path(__file__).resolve().parents[1] / "fixtures" / "nvidia-smi"


@pytest.fixture
def fake_smi(monkeypatch, tmp_path):
    """Put the fake nvidia-smi first on PATH; returns a function that selects the scenario."""
    script = FAKE_SMI_DIR / "nvidia-smi"
    if not os.access(script, os.X_OK):  # a checkout that lost the exec bit
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{FAKE_SMI_DIR}{os.pathsep}{os.environ.get('PATH', '')}")
    (tmp_path / "proc").mkdir()

    def use(scenario):
        monkeypatch.setenv("FAKE_NVIDIA_SMI_SCENARIO", scenario)
        return NvidiaSmiBackend(proc_root=str(tmp_path / "proc"))

    return use


def test_normal(fake_smi):
    readings = fake_smi("normal").sample()
    assert len(readings) == 2
    first, second = readings
    assert first.index == 0
    assert first.uuid == "GPU-3f5c1a2b-7d4e-4b8a-9c21-0e6f5d3a1b2c"
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert (first.memory_total_mib, first.memory_used_mib, first.utilization_pct) == (81559, 42311, 87)
    assert [(p.pid, p.used_mib, p.name) for p in first.processes] == [
        (1843211, 40960, "/opt/llama.cpp/build/bin/llama-server"),
        (1843377, 1336, "/home/ml/venv,prod/bin/python3"),  # comma inside the last column
    ]
    assert second.processes == () and second.utilization_pct == 0
    assert not first.mig and not first.simulated
    # temperature.gpu and power.draw ("512.37" W: the nearest watt, as the NVML backend gives it)
    assert (first.temperature_c, first.power_w) == (64, 512)
    assert (second.temperature_c, second.power_w) == (31, 72)


def test_eight_gpus(fake_smi):
    readings = fake_smi("eight_gpus").sample()
    assert [r.index for r in readings] == list(range(8))
    assert readings[5].memory_used_mib == 5004 and readings[5].utilization_pct == 50
    assert [(r.temperature_c, r.power_w) for r in readings[:3]] == [(30, 60), (35, 100), (40, 140)]
    assert [p.pid for p in readings[3].processes] == [2201]
    assert [p.pid for p in readings[7].processes] == [2202]
    assert sum(len(r.processes) for r in readings) == 2


def test_na_fields(fake_smi):
    a100, t4 = fake_smi("na_fields").sample()
    assert a100.utilization_pct is None and a100.memory_used_mib == 11
    assert [(p.pid, p.used_mib) for p in a100.processes] == [(5150, None), (5151, None)]
    # unavailable memory figures are reported as 0 rather than failing the whole sample
    assert (t4.memory_total_mib, t4.memory_used_mib, t4.utilization_pct) == (0, 0, None)
    # a board that does not report its power draw ("[N/A]", "[Not Supported]"): None, "—" on the dashboard
    assert (a100.temperature_c, a100.power_w) == (33, None)
    assert (t4.temperature_c, t4.power_w) == (None, None)


def test_no_processes(fake_smi):
    (reading,) = fake_smi("no_processes").sample()
    assert reading.name == "NVIDIA GeForce RTX 4090" and reading.processes == ()


def test_driver_failure(fake_smi):
    with pytest.raises(TelemetryError, match="couldn't communicate with the NVIDIA driver") as info:
        fake_smi("driver_failure").sample()
    assert "exit 9" in str(info.value)


def test_hang_times_out(fake_smi, monkeypatch):
    monkeypatch.setenv("FAKE_NVIDIA_SMI_SCENARIO", "hang")
    backend = NvidiaSmiBackend(timeout=0.5)
    with pytest.raises(TelemetryError, match=r"nvidia-smi timed out after 0.5s"):
        backend.sample()


def test_missing_binary(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(TelemetryError, match="nvidia-smi not found on PATH"):
        NvidiaSmiBackend().sample()
    with pytest.raises(TelemetryError, match="not found"):
        NvidiaSmiBackend(binary=str(tmp_path / "nvidia-smi")).sample()
    with pytest.raises(TelemetryError, match="nvidia-smi not found on PATH"):
        get_backend("nvidia-smi")
    assert get_backend("auto").name in ("none", "nvml")


def test_auto_uses_working_nvidia_smi_and_skips_broken_one(fake_smi, monkeypatch):
    from gpus.telemetry import nvml

    def no_nvml(*args, **kwargs):
        raise TelemetryError("NVML Shared Library Not Found")

    monkeypatch.setattr(nvml.NvmlBackend, "__init__", no_nvml)
    fake_smi("normal")
    assert get_backend("auto").name == "nvidia-smi"
    fake_smi("driver_failure")
    assert get_backend("auto").name == "none"
    assert get_backend("auto").sample() == []


def test_nspid_mapping_applies(fake_smi, tmp_path):
    status = tmp_path / "proc" / "33"
    status.mkdir(parents=True)
    status.joinpath("status").write_text("Name:\tllama-server\nNSpid:\t33\t1843211\n")
    first = fake_smi("normal").sample()[0]
    assert [p.pid for p in first.processes] == [33, 1843377]


def test_parsers_on_odd_lines():
    (gpu,) = parse_gpus("3, GPU-x, Weird, Name GPU, 100, N/A, , 45, 250.5\n")
    assert (gpu["index"], gpu["name"], gpu["memory_used_mib"], gpu["utilization_pct"]) == (
        3,
        "Weird, Name GPU",
        0,
        None,
    )
    assert (gpu["temperature_c"], gpu["power_w"]) == (45, 250)  # a comma in the name shifts nothing
    with pytest.raises(TelemetryError, match="unexpected"):  # the columns of the old query: six, not eight
        parse_gpus("0, GPU-x, NVIDIA H100, 81559, 1, 0\n")
    assert parse_apps("") == []
    assert parse_apps("No running processes found\n") == []
    with pytest.raises(TelemetryError, match="unexpected"):
        parse_gpus("garbage\n")
