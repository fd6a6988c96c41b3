"""python -m gpus.telemetry, run as a subprocess from the repo root like a GPU machine would."""

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.conftest import FAKE_GPU_UUIDS

REPO = Path(__file__).resolve().parents[2]
FAKE_SMI_DIR = REPO / "tests" / "fixtures" / "nvidia-smi"
TOP_KEYS = {"backend", "sample_ms", "gpus"}
GPU_KEYS = {
    "index", "uuid", "name", "memory_total_mib", "memory_used_mib", "utilization_pct", "temperature_c", "power_w",
    "processes",
}  # fmt: skip
PROC_KEYS = {"pid", "name", "used_mib"}


def run_cli(*args, **env):
    full_env = {**os.environ, **env}
    if "LLAMACONTROLLER_FAKE_GPUS" not in env:
        full_env.pop("LLAMACONTROLLER_FAKE_GPUS", None)
    return subprocess.run(
        [sys.executable, "-m", "gpus.telemetry", *args],
        cwd=REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def check_keys(data):
    assert set(data) == TOP_KEYS
    for gpu in data["gpus"]:
        assert set(gpu) == GPU_KEYS
        for proc in gpu["processes"]:
            assert set(proc) == PROC_KEYS


def write_fake_gpus(tmp_path):
    path = tmp_path / "gpus.json"
    path.write_text(
        json.dumps(
            {
                "gpus": [
                    {
                        "index": 0,
                        "uuid": FAKE_GPU_UUIDS[0],
                        "name": "Simulated RTX 4090",
                        "memory_total_mib": 24564,
                        "baseline_used_mib": 250,
                        "foreign_processes": [{"pid": 4242, "name": "other.py", "used_mib": 9000}],
                    }
                ]
            }
        )
    )
    return path


def test_fake_backend_json(tmp_path):
    path = write_fake_gpus(tmp_path)
    result = run_cli("--backend", "fake", "--json", "--repeat", "3", "--fake-gpus", str(path))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    check_keys(data)
    assert data["backend"] == "fake"
    assert isinstance(data["sample_ms"], float) and data["sample_ms"] >= 0
    assert data["sample_ms"] == round(data["sample_ms"], 3)
    (gpu,) = data["gpus"]
    assert gpu["memory_used_mib"] == 9250 and gpu["utilization_pct"] is None
    assert gpu["processes"] == [{"pid": 4242, "name": "other.py", "used_mib": 9000}]


def test_fake_gpus_from_environment_and_table(tmp_path):
    path = write_fake_gpus(tmp_path)
    result = run_cli("--backend", "fake", LLAMACONTROLLER_FAKE_GPUS=str(path))
    assert result.returncode == 0, result.stderr
    assert "GPU 0" in result.stdout and "9250/24564 MiB" in result.stdout and "other.py" in result.stdout


def test_fake_backend_errors_exit_2(tmp_path):
    result = run_cli("--backend", "fake", "--json")
    assert result.returncode == 2 and result.stdout == ""
    assert "fake" in result.stderr
    result = run_cli("--backend", "fake", "--fake-gpus", str(tmp_path / "missing.json"))
    assert result.returncode == 2 and "not found" in result.stderr


def smi_env(scenario):
    return {
        "PATH": f"{FAKE_SMI_DIR}{os.pathsep}{os.environ.get('PATH', '')}",
        "FAKE_NVIDIA_SMI_SCENARIO": scenario,
    }


def test_nvidia_smi_json():
    result = run_cli("--backend", "nvidia-smi", "--json", **smi_env("normal"))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    check_keys(data)
    assert data["backend"] == "nvidia-smi"
    assert [g["index"] for g in data["gpus"]] == [0, 1]
    assert data["gpus"][0]["processes"][0] == {
        "pid": 1843211,
        "name": "/opt/llama.cpp/build/bin/llama-server",
        "used_mib": 40960,
    }


def test_nvidia_smi_table():
    result = run_cli("--backend", "nvidia-smi", **smi_env("eight_gpus"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("NVIDIA A100-SXM4-80GB") == 8
    assert "util 50%  55 °C  261 W" in result.stdout  # GPU 5: 260.55 W


def test_nvidia_smi_driver_failure_exit_2():
    result = run_cli("--backend", "nvidia-smi", "--json", **smi_env("driver_failure"))
    assert result.returncode == 2 and result.stdout == ""
    assert "couldn't communicate with the NVIDIA driver" in result.stderr
