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


def run_deploy_check(tmp_path, **env):
    base = {
        k: v for k, v in os.environ.items() if not k.startswith(("LLAMACONTROLLER_", "DATABASE_URL", "DEBUG"))
    }
    base.update(
        DJANGO_SETTINGS_MODULE="llamacontroller_site.settings",
        # A production-like key: long and random, as check --deploy wants.
        SECRET_KEY="k7#Qp2vX9mL4zR8wT1yB6nH3jF5dS0aG-ecUoIiPlKjMnBvCxZq",
        LLAMACONTROLLER_DATA_DIR=str(tmp_path),
        REDIS_URL="redis://:a-password@127.0.0.1:1/0",
        DEBUG="false",
    )
    base.update(env)
    return subprocess.run(
        [sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"],
        cwd=REPO, env=base, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_https_mode_passes_the_deploy_check(tmp_path):
    result = run_deploy_check(tmp_path, LLAMACONTROLLER_HTTPS="1")
    assert result.returncode == 0, result.stderr
    assert "no issues" in result.stdout


def test_without_https_mode_the_deploy_check_names_what_is_missing(tmp_path):
    result = run_deploy_check(tmp_path)
    assert result.returncode != 0
    for check in ("security.W004", "security.W008", "security.W012", "security.W016"):
        assert check in result.stderr


def test_https_mode_settings(tmp_path):
    code = (
        "from django.conf import settings as s; print(s.SESSION_COOKIE_SECURE, s.CSRF_COOKIE_SECURE, "
        "s.SECURE_SSL_REDIRECT, s.SECURE_HSTS_SECONDS, s.SECURE_HSTS_INCLUDE_SUBDOMAINS, s.SECURE_PROXY_SSL_HEADER)"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("LLAMACONTROLLER_")}
    base.update(
        DJANGO_SETTINGS_MODULE="llamacontroller_site.settings",
        SECRET_KEY="x",
        LLAMACONTROLLER_DATA_DIR=str(tmp_path),
        LLAMACONTROLLER_HTTPS="on",
        LLAMACONTROLLER_HSTS_SECONDS="3600",
        LLAMACONTROLLER_HSTS_INCLUDE_SUBDOMAINS="1",
    )
    result = subprocess.run(
        [sys.executable, "-c", "import django; django.setup(); " + code],
        cwd=REPO,
        env=base,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.stdout.split() == [
        "True",
        "True",
        "True",
        "3600",
        "True",
        "('HTTP_X_FORWARDED_PROTO',",
        "'https')",
    ]


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("LLAMACONTROLLER_HTTPS", "yes", "LLAMACONTROLLER_HTTPS='yes' is not a boolean"),
        ("LLAMACONTROLLER_HSTS_SECONDS", "a year", "LLAMACONTROLLER_HSTS_SECONDS='a year' is not an integer"),
        ("LLAMACONTROLLER_PROXY_COUNT", "-1", "LLAMACONTROLLER_PROXY_COUNT=-1 is below the minimum"),
    ],
)
def test_bad_security_values_stop_startup(tmp_path, name, value, message):
    result = run_check(tmp_path, **{"LLAMACONTROLLER_HTTPS": "1", name: value})
    assert result.returncode != 0 and message in result.stderr
