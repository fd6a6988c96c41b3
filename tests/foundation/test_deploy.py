"""deploy/ cannot rot silently: the units start what this repository has (the run command's web server, the Celery
app, manage.py), the example environment lists every variable the settings read, and nginx's limits match the
app's. Where nginx or systemd-analyze is installed, the files are also checked by them."""

import importlib.util
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llamacontroller_site import env as env_module
from llamacontroller_site.runner import web_command

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
INSTALL = "/opt/llamacontroller"
VENV_BIN = Path(INSTALL) / ".venv" / "bin"
ENV_FILE = "/etc/llamacontroller/llamacontroller.env"
UNITS = [
    "llamacontroller-web.service",
    "llamacontroller-beat.service",
    "llamacontroller-default-worker.service",
    "llamacontroller-worker.service",
]


def unit(name: str) -> dict[str, list[str]]:
    """A unit file's [Service] and [Unit] settings: key -> every value given (ExecStartPre may repeat)."""
    values: dict[str, list[str]] = {}
    for line in (DEPLOY / name).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")):
            continue
        key, _, value = line.partition("=")
        values.setdefault(key.strip(), []).append(value.strip())
    return values


def argv(command: str) -> list[str]:
    return shlex.split(command.replace("%%", "%"))


def settings_variables() -> set[str]:
    """Every environment variable llamacontroller_site/settings.py reads (env helpers and os.environ)."""
    helpers = "|".join(name for name in dir(env_module) if name.startswith("env"))
    source = (ROOT / "llamacontroller_site" / "settings.py").read_text()
    return set(re.findall(rf'(?:\b(?:{helpers})|os\.environ\.get)\(\s*"([A-Z][A-Z0-9_]*)"', source))


@pytest.mark.parametrize("name", UNITS)
def test_every_unit_restarts_and_reads_the_environment_file(name):
    service = unit(name)
    assert service["Restart"] == ["always"]
    assert service["EnvironmentFile"] == [ENV_FILE]
    assert service["WorkingDirectory"] == [INSTALL]
    assert "DJANGO_SETTINGS_MODULE=llamacontroller_site.settings" in service["Environment"][0].split()
    for command in service["ExecStart"] + service.get("ExecStartPre", []):
        program = Path(argv(command)[0])
        if program.parent == VENV_BIN:  # a program of this project's virtual environment
            assert (Path(sys.executable).parent / program.name).exists(), command
        else:
            assert program.is_absolute() and program.exists(), command
        if program.name == "python":
            assert (ROOT / argv(command)[1]).is_file(), command  # manage.py


def test_the_web_unit_runs_the_run_commands_web_server():
    """Same application, worker class and options as `./lc.sh run` (runner.web_command), on loopback."""
    (command,) = unit("llamacontroller-web.service")["ExecStart"]
    assert argv(command) == web_command(VENV_BIN, bind="127.0.0.1:8000", workers=4)
    app_module, _, app_name = argv(command)[1].partition(":")
    assert app_name in (ROOT / Path(*app_module.split("."))).with_suffix(".py").read_text()
    worker_class = argv(command)[argv(command).index("-k") + 1]
    assert importlib.util.find_spec(worker_class.rsplit(".", 1)[0]) is not None


def test_the_celery_units():
    celery = [str(VENV_BIN / "celery"), "-A", "llamacontroller_site"]
    assert (ROOT / "llamacontroller_site" / "celery.py").is_file()
    (beat,) = unit("llamacontroller-beat.service")["ExecStart"]
    assert argv(beat)[:4] == celery + ["beat"]
    (default,) = unit("llamacontroller-default-worker.service")["ExecStart"]
    assert argv(default)[:6] == celery + ["worker", "-Q", "default"]

    worker = unit("llamacontroller-worker.service")
    (command,) = worker["ExecStart"]
    words = argv(command)
    assert words[:4] == celery + ["worker"]
    # The queue and node name follow the host name, as the settings' HOST_QUEUE does.
    assert words[words.index("-Q") + 1] == "host.${LLAMACONTROLLER_HOST_NAME}"
    assert words[words.index("-n") + 1] == "${LLAMACONTROLLER_HOST_NAME}@%h"
    # The llama-servers outlive a worker restart (they are adopted); a refused start (78) is not retried.
    assert worker["KillMode"] == ["process"]
    assert worker["RestartPreventExitStatus"] == ["78"]
    assert "SystemExit(78)" in (ROOT / "models_app" / "tasks.py").read_text()


def test_the_environment_example_lists_every_variable_the_settings_read():
    listed = set(
        re.findall(r"^#? ?([A-Z][A-Z0-9_]*)=", (DEPLOY / "llamacontroller.env.example").read_text(), re.M)
    )
    read = settings_variables()
    assert {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "LLAMACONTROLLER_HOST_NAME"} <= read
    assert not read - listed, f"add to deploy/llamacontroller.env.example: {sorted(read - listed)}"
    assert not listed - read, f"not read by the settings: {sorted(listed - read)}"


def test_the_environment_example_has_no_inline_comments():
    """systemd takes `NAME=value  # note` as the value `value  # note`."""
    for line in (DEPLOY / "llamacontroller.env.example").read_text().splitlines():
        if re.match(r"^[A-Z][A-Z0-9_]*=", line):
            assert "#" not in line, line


def test_nginx_matches_the_gateway():
    from django.conf import settings

    conf = (DEPLOY / "nginx.conf").read_text()
    (body,) = re.findall(r"client_max_body_size (\d+)m;", conf)
    assert int(body) * 1024 * 1024 == settings.GATEWAY_MAX_BODY_BYTES
    for prefix in ("/api/", "/v1/"):  # the Ollama and OpenAI endpoints
        block = re.search(rf"location {re.escape(prefix)} \{{(.*?)\}}", conf, re.S).group(1)
        assert "proxy_buffering off;" in block and "gzip off;" in block
        (read,) = re.findall(r"proxy_read_timeout (\d+)s;", block)
        assert int(read) >= settings.GATEWAY_MAX_REQUEST_SECONDS
    assert "proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;" in conf  # PROXY_COUNT=1
    assert "proxy_set_header X-Forwarded-Proto $scheme;" in conf  # overwritten, never the client's


@pytest.mark.skipif(not shutil.which("nginx") or not shutil.which("openssl"), reason="nginx not installed")
def test_nginx_accepts_the_config(tmp_path):
    """`nginx -t` on deploy/nginx.conf, with a throwaway certificate in place of the example's paths."""
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=llm.example.com",
         "-keyout", str(tmp_path / "key.pem"), "-out", str(tmp_path / "cert.pem")],
        check=True, capture_output=True,
    )  # fmt: skip
    site = (DEPLOY / "nginx.conf").read_text()
    site = re.sub(r"ssl_certificate\s+(\S+);", f"ssl_certificate {tmp_path}/cert.pem;", site)
    site = re.sub(r"ssl_certificate_key\s+(\S+);", f"ssl_certificate_key {tmp_path}/key.pem;", site)
    (tmp_path / "site.conf").write_text(site)
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{\n  access_log off;\n  client_body_temp_path {tmp_path}/body;\n  proxy_temp_path {tmp_path}/proxy;\n"
        f"  include {tmp_path}/site.conf;\n}}\n"
    )
    checked = subprocess.run(
        ["nginx", "-t", "-c", str(tmp_path / "nginx.conf"), "-p", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert checked.returncode == 0, checked.stderr
    assert "test is successful" in checked.stderr


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="systemd-analyze not installed")
def test_systemd_analyze_verifies_the_units(tmp_path):
    """`systemd-analyze verify`, with the install folder pointed at this checkout and its virtual environment
    (it checks that the programs exist)."""
    for name in UNITS:
        text = (DEPLOY / name).read_text().replace(str(VENV_BIN), str(Path(sys.executable).parent))
        (tmp_path / name).write_text(text.replace(INSTALL, str(ROOT)))
    checked = subprocess.run(
        ["systemd-analyze", "verify", *UNITS], cwd=tmp_path, capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 0 and not checked.stderr.strip(), checked.stderr
