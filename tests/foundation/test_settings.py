"""Bad configuration stops start-up with a message naming the variable."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

CASES = [
    ("DEBUG", "yes", "DEBUG='yes' is not a boolean"),
    ("LLAMACONTROLLER_PORT_RANGE", "abc", "LLAMACONTROLLER_PORT_RANGE='abc' is not a port range"),
    ("LLAMACONTROLLER_PORT_RANGE", "9000-8000", "LLAMACONTROLLER_PORT_RANGE='9000-8000'"),
    (
        "LLAMACONTROLLER_GPU_REFRESH_SECONDS",
        "fast",
        "LLAMACONTROLLER_GPU_REFRESH_SECONDS='fast' is not an integer",
    ),
    ("LLAMACONTROLLER_RECONCILE_SECONDS", "0", "LLAMACONTROLLER_RECONCILE_SECONDS=0 is below the minimum"),
    ("LLAMACONTROLLER_GPU_BACKEND", "cuda", "LLAMACONTROLLER_GPU_BACKEND='cuda' is not one of"),
    ("DATABASE_URL", "nonsense://x", "DATABASE_URL='nonsense://x'"),
    ("REDIS_URL", "http://localhost", "REDIS_URL='http://localhost' is not a redis:// URL"),
    ("LLAMACONTROLLER_SAMPLE_RETENTION_DAYS", "-1", "LLAMACONTROLLER_SAMPLE_RETENTION_DAYS=-1 is below"),
]


def run_check(tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith(("LLAMACONTROLLER_", "DATABASE_URL"))}
    base.update(
        DJANGO_SETTINGS_MODULE="llamacontroller_site.settings",
        SECRET_KEY="x",
        LLAMACONTROLLER_DATA_DIR=str(tmp_path),
        REDIS_URL="redis://127.0.0.1:1/0",
    )
    base.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=REPO, env=base, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize(("name", "value", "message"), CASES)
def test_bad_value_stops_startup_naming_the_variable(tmp_path, name, value, message):
    result = run_check(tmp_path, **{name: value})
    assert result.returncode != 0
    assert "ImproperlyConfigured" in result.stderr
    assert message in result.stderr


def test_production_run_refuses_to_start_without_secret_key(tmp_path):
    result = run_check(tmp_path, SECRET_KEY="")
    assert result.returncode != 0
    assert "SECRET_KEY is not set" in result.stderr


def test_generated_secret_key_in_data_folder_is_used(tmp_path):
    (tmp_path / "secret_key").write_text("generated-by-the-run-command")
    assert run_check(tmp_path, SECRET_KEY="").returncode == 0


def test_fake_backend_needs_its_file(tmp_path):
    result = run_check(tmp_path, LLAMACONTROLLER_GPU_BACKEND="fake")
    assert result.returncode != 0
    assert "LLAMACONTROLLER_FAKE_GPUS" in result.stderr


def test_good_values_start(tmp_path):
    result = run_check(tmp_path, DEBUG="false", LLAMACONTROLLER_PORT_RANGE="9000-9010")
    assert result.returncode == 0, result.stderr
