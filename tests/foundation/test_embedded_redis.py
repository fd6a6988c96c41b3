import os
import stat
from pathlib import Path

import psutil
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from llamacontroller_site import first_run
from llamacontroller_site.embedded_redis import EmbeddedRedis


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_embedded_redis_starts_serves_and_stops_without_leftovers():
    server = EmbeddedRedis().start()
    pid = server.process.pid
    try:
        client = redis.Redis.from_url(server.url)
        client.set("k", "v")
        assert client.get("k") == b"v"
        assert server.url.startswith("redis://:") and "@127.0.0.1:" in server.url
    finally:
        server.stop()
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    assert not server.ping()


def test_embedded_redis_refuses_callers_without_the_password():
    """Another local user reaches the loopback port, but cannot queue a task without the password."""
    with EmbeddedRedis("the-right-password") as server:
        once = Retry(NoBackoff(), 0)  # refused is refused: no retrying with back-off
        stranger = redis.Redis(host="127.0.0.1", port=server.port, retry=once)
        with pytest.raises(redis.AuthenticationError):
            stranger.lpush("default", "{}")
        wrong = redis.Redis(host="127.0.0.1", port=server.port, password="guess", retry=once)
        with pytest.raises(redis.AuthenticationError):
            wrong.ping()
        # Nor can they read it off the command line.
        cmdline = " ".join(psutil.Process(server.process.pid).cmdline())
        assert "the-right-password" not in cmdline
        assert redis.Redis.from_url(server.url).ping()


def test_run_command_keeps_password_and_url_in_0600_files(tmp_path):
    old = os.umask(0o022)  # an ordinary umask: a plain write would make these 0644
    try:
        server = first_run.start_embedded_redis(tmp_path)
    finally:
        os.umask(old)
    try:
        password_file, url_file = tmp_path / "embedded-redis.password", tmp_path / "embedded-redis.url"
        assert mode(password_file) == 0o600 and mode(url_file) == 0o600
        assert url_file.read_text() == server.url and password_file.read_text() in server.url
        assert redis.Redis.from_url(url_file.read_text()).ping()
    finally:
        server.stop()
    # The next run keeps the password; a URL file left world-readable by an older version is narrowed.
    url_file.chmod(0o644)
    again = first_run.start_embedded_redis(tmp_path)
    try:
        assert again.password == password_file.read_text() and mode(url_file) == 0o600
    finally:
        again.stop()


def test_generated_secret_key_is_0600_from_the_start(tmp_path, monkeypatch):
    monkeypatch.delenv("SECRET_KEY", raising=False)
    monkeypatch.setenv("LLAMACONTROLLER_GPU_BACKEND", "fake")
    monkeypatch.setenv("LLAMACONTROLLER_DATA_DIR", str(tmp_path))  # restored after the test
    # No chmod after the write: with the most permissive umask the file must still be born 0600.
    monkeypatch.setattr(Path, "chmod", lambda *a, **k: pytest.fail("chmod after writing: a race"))
    old = os.umask(0)
    try:
        first_run.prepare_environment(tmp_path / "data")
    finally:
        os.umask(old)
    key_file = tmp_path / "data" / "secret_key"
    assert mode(key_file) == 0o600 and len(key_file.read_text()) >= 50
    assert mode(tmp_path / "data") == 0o700


@pytest.mark.django_db
def test_run_command_does_not_echo_a_supplied_admin_password(monkeypatch, capsys):
    from django.contrib.auth.models import User

    monkeypatch.setenv("LLAMACONTROLLER_ADMIN_PASSWORD", "my-own-secret-password")
    first_run.create_admin()
    out = capsys.readouterr().out
    assert "my-own-secret-password" not in out
    assert "password from LLAMACONTROLLER_ADMIN_PASSWORD" in out
    assert User.objects.get(username="admin").check_password("my-own-secret-password")


@pytest.mark.django_db
def test_run_command_shows_a_generated_admin_password_once(monkeypatch, capsys):
    from django.contrib.auth.models import User

    monkeypatch.delenv("LLAMACONTROLLER_ADMIN_PASSWORD", raising=False)
    first_run.create_admin()
    password = capsys.readouterr().out.split("password: ")[1].split()[0]
    assert User.objects.get(username="admin").check_password(password)
