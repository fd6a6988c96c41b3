"""Binaries come only from the worker host's configuration and are verified: discovery, /bin/sh refused,
the catalogue re-read when the file changes, and the scrubbed environment llama-server gets."""

import os
import stat
import time
from pathlib import Path

import psutil
import pytest
import requests
from rest_framework.test import APIClient

from models_app import binaries, estimates, processes, tasks
from models_app.models import GpuInstance, LlamaBinary, ModelConfig
from models_app.services import request_load

HELP = Path(__file__).resolve().parent.parent / "fixtures" / "llama-server" / "help.txt"


def fake_llama_server(path: Path, version: str = "6100") -> Path:
    """A script that answers --version and --help as llama-server does (from the captured help)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "#!/bin/sh\n"
        f'case "$1" in --version) echo "version: {version} (abc1234)" >&2;; --help) cat "{HELP}";; esac\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return path


def test_bin_sh_can_never_become_a_binary(fake_gpus, settings, tmp_path):
    settings.LLAMA_SERVER = "/bin/sh"
    folder = tmp_path / "builds"
    folder.mkdir()
    (folder / "llama-server").symlink_to("/bin/sh")  # named right, but not llama.cpp
    (folder / "llama-server-bash").symlink_to("/bin/bash")
    settings.LLAMA_SERVER_DIRS = [folder]
    host = fake_gpus.host
    assert binaries.store_on_host(host) is None
    assert "/bin/sh is not a usable llama-server" in host.llama_server_error
    rows = {row.path: row for row in LlamaBinary.objects.filter(host=host)}
    refused = ["/bin/sh", str(folder / "llama-server"), str(folder / "llama-server-bash")]
    assert all(rows[p].error and not rows[p].is_default and not rows[p].catalogue for p in refused)
    assert "not llama.cpp's 'version: N (commit)'" in rows[str(folder / "llama-server-bash")].error
    with pytest.raises(binaries.BinaryError):
        binaries.binary_for_load(host, rows["/bin/sh"])


def test_api_cannot_pin_an_unverified_binary(users, fake_gpus, tiny_model):
    row = LlamaBinary.objects.create(host=fake_gpus.host, name="sh", path="/bin/sh", error="not llama.cpp")
    client = APIClient()
    client.force_login(users["admin"])
    response = client.patch("/api/v1/models/tiny/", {"binary": row.pk}, format="json")
    assert response.status_code == 400 and "binary" in response.json()
    assert ModelConfig.objects.get(pk="tiny").binary is None
    # There is no path to type: the field takes a row id.
    response = client.patch("/api/v1/models/tiny/", {"binary": "/bin/sh"}, format="json")
    assert response.status_code == 400


def test_discovery_from_configuration_and_folders(fake_gpus, settings, tmp_path, llama_server_path):
    folder = tmp_path / "builds"
    fake_llama_server(folder / "b6100" / "llama-server")
    fake_llama_server(folder / "llama-server-old", version="5000")
    (folder / "not-a-server").write_text("x")
    settings.LLAMA_SERVER = llama_server_path
    settings.LLAMA_SERVER_DIRS = [folder]
    host = fake_gpus.host
    assert binaries.store_on_host(host) == llama_server_path
    rows = {row.path: row for row in LlamaBinary.objects.filter(host=host)}
    assert str(folder / "not-a-server") not in rows
    assert rows[llama_server_path].is_default and not rows[llama_server_path].error
    assert rows[str(folder / "b6100" / "llama-server")].version == "b6100"
    assert rows[str(folder / "llama-server-old")].version == "b5000"
    assert sum(row.is_default for row in rows.values()) == 1
    assert "-ngl" in {n for o in rows[llama_server_path].catalogue["options"] for n in o["names"]}
    # A build that disappears stays (models may pin it) but is no longer usable.
    (folder / "llama-server-old").unlink()
    binaries.store_on_host(host)
    gone = LlamaBinary.objects.get(host=host, path=str(folder / "llama-server-old"))
    assert gone.error and not gone.is_default


def test_catalogue_is_read_again_when_the_file_changes(fake_gpus, settings, tmp_path):
    path = fake_llama_server(tmp_path / "bin" / "llama-server", version="6100")
    settings.LLAMA_SERVER = str(path)
    binaries.store_on_host(fake_gpus.host)
    row = LlamaBinary.objects.get(host=fake_gpus.host, path=str(path))
    assert row.version == "b6100" and row.is_default
    assert binaries.binary_for_load(fake_gpus.host).version == "b6100"
    fake_llama_server(path, version="6200")  # rebuilt in place
    os.utime(path, (time.time() + 5, time.time() + 5))
    assert binaries.binary_for_load(fake_gpus.host).version == "b6200"
    row.refresh_from_db()
    assert row.version == "b6200" and row.file_mtime == path.stat().st_mtime


def test_a_loads_catalogue_is_parsed_once_and_read_again_when_the_file_changes(
    fake_gpus, settings, tmp_path, django_assert_num_queries
):
    path = fake_llama_server(tmp_path / "bin" / "llama-server", version="6100")
    settings.LLAMA_SERVER = str(path)
    binaries.store_on_host(fake_gpus.host)
    first = binaries.catalogue_for(binaries.binary_for_load(fake_gpus.host))
    assert first.version == "b6100" and "-ngl" in first.by_spelling
    with django_assert_num_queries(1):  # the row without its catalogue (~65 kB of JSON); the parsed one again
        row = binaries.binary_for_load(fake_gpus.host)
        assert binaries.catalogue_for(row) is first
    assert "catalogue" in row.get_deferred_fields()
    fake_llama_server(path, version="6200")  # rebuilt in place
    os.utime(path, (time.time() + 5, time.time() + 5))
    again = binaries.catalogue_for(binaries.binary_for_load(fake_gpus.host))
    assert again is not first and again.version == "b6200"
    # The estimate of a load reads it the same way.
    model = ModelConfig(id="probe", name="probe", path="/nowhere.gguf", cli_params={"c": 512})
    with django_assert_num_queries(1):
        assert estimates.options_for(model, estimates.binary_for(model, fake_gpus.host))["ctx-size"] == 512


def test_scrubbed_environment():
    source = {
        "PATH": "/usr/bin", "HOME": "/home/x", "LANG": "C.UTF-8", "LC_ALL": "C", "TMPDIR": "/tmp",
        "CUDA_HOME": "/usr/local/cuda", "LD_LIBRARY_PATH": "/x", "GGML_CUDA_NO_PINNED": "1",
        "HIP_VISIBLE_DEVICES": "0", "SECRET_KEY": "s", "DATABASE_URL": "postgres://u:p@h/d",
        "REDIS_URL": "redis://:p@h", "LLAMACONTROLLER_ADMIN_PASSWORD": "p", "LLAMA_ARG_MODEL_URL": "http://x",
        "HF_TOKEN": "t", "LLAMA_API_KEY": "inherited", "AWS_SECRET_ACCESS_KEY": "a", "LD_PRELOAD": "/evil.so",
    }  # fmt: skip
    assert set(processes.scrubbed_env(source)) == {
        "PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "CUDA_HOME", "LD_LIBRARY_PATH", "GGML_CUDA_NO_PINNED",
        "HIP_VISIBLE_DEVICES",
    }  # fmt: skip


def test_started_server_gets_no_secrets_and_its_own_api_key(
    fake_gpus, tiny_model, llama_server_path, settings, monkeypatch, no_stray_servers
):
    settings.LLAMA_SERVER = llama_server_path
    settings.LOAD_TIMEOUT = 20
    monkeypatch.setenv("SECRET_KEY", "do-not-leak")
    monkeypatch.setenv("DATABASE_URL", "postgres://user:do-not-leak@db/x")
    monkeypatch.setenv("REDIS_URL", "redis://:do-not-leak@127.0.0.1:1")
    monkeypatch.setenv("LLAMACONTROLLER_ADMIN_PASSWORD", "do-not-leak")
    monkeypatch.setenv("LLAMA_ARG_CTX_SIZE", "999")
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    tasks.load_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == GpuInstance.Status.RUNNING, instance.error
    with open(f"/proc/{instance.pid}/environ", "rb") as handle:
        environ = dict(item.split(b"=", 1) for item in handle.read().split(b"\0") if b"=" in item)
    names = {name.decode() for name in environ}
    assert not names & {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "LLAMACONTROLLER_ADMIN_PASSWORD"}
    assert "LLAMA_ARG_CTX_SIZE" not in names
    assert b"do-not-leak" not in b"\0".join(environ.values())
    assert environ[b"LLAMACONTROLLER_INSTANCE_ID"] == str(instance.pk).encode()
    assert environ[b"LLAMA_API_KEY"] == instance.api_key.encode() and len(instance.api_key) >= 32
    # The key is in the environment (readable by its user only), not in the argument list `ps` shows.
    assert instance.api_key not in " ".join(psutil.Process(instance.pid).cmdline())
    assert instance.argv[-2:] == ["--alias", "tiny"]
    base = f"http://127.0.0.1:{instance.port}"
    session = requests.Session()
    session.trust_env = False
    assert session.get(f"{base}/health", timeout=5).status_code == 200  # public: the controller's check
    assert session.get(f"{base}/v1/models", timeout=5).status_code == 401
    authorized = session.get(f"{base}/v1/models", headers={"Authorization": f"Bearer {instance.api_key}"})
    assert authorized.status_code == 200 and authorized.json()["data"][0]["id"] == "tiny"
    tasks.unload_model(instance.pk)


def test_api_and_admin_never_show_the_api_key(users, fake_gpus, tiny_model, client):
    from tests.helpers import running_instance

    instance = running_instance(fake_gpus.host, tiny_model, [fake_gpus.gpus[0]])
    GpuInstance.objects.filter(pk=instance.pk).update(api_key="secret-instance-key")
    client.force_login(users["admin"])
    api = APIClient()
    api.force_login(users["admin"])
    assert "secret-instance-key" not in api.get(f"/api/v1/instances/{instance.pk}/").content.decode()
    assert "secret-instance-key" not in api.get("/api/v1/instances/").content.decode()
    page = client.get(f"/admin/models_app/gpuinstance/{instance.pk}/change/").content.decode()
    assert "secret-instance-key" not in page


def test_a_flag_the_binary_no_longer_knows_fails_the_load_without_retry(
    fake_gpus, tiny_model, llama_server_path, settings, no_stray_servers
):
    settings.LLAMA_SERVER = llama_server_path
    ModelConfig.objects.filter(pk="tiny").update(cli_params={"ngll": 99})  # written behind the checks
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    tasks.load_model(instance.pk)
    instance.refresh_from_db()
    assert instance.status == GpuInstance.Status.FAILED
    assert "has no flag 'ngll' (did you mean 'ngl'?)" in instance.error
    assert instance.pid is None
