"""What `./lc.sh run` prepares before it starts anything (llamacontroller_site/runner.py): the data folder's
environment (secret key, simulated GPUs when there is no NVIDIA GPU), the migrated database, the first admin account,
the tiny test model, the collected static files and the embedded Redis. Each step is safe to repeat at every start.
Django is imported inside the functions that need it: the environment must be in place before it is set up."""

import fcntl
import json
import os
import secrets
import socket
import sys
from pathlib import Path

from llamacontroller_site.private_files import create_private, private_secret, write_private
from llamacontroller_site.supervision import say, show

REPO = Path(__file__).resolve().parent.parent


def prepare_environment(data_dir: Path) -> list[str]:
    """Everything the settings read must be in place before Django starts. Returns what to tell the user,
    once nothing can refuse the start any more."""
    notes = []
    # A new data folder is the owner's alone: it holds the database, the secret key and the Redis password.
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["LLAMACONTROLLER_DATA_DIR"] = str(data_dir)
    key_file = data_dir / "secret_key"
    # 0600 from the first byte (no chmod after the write, so nobody can read it in between).
    if not os.environ.get("SECRET_KEY") and create_private(key_file, secrets.token_urlsafe(50)):
        notes.append(f"generated a secret key in {key_file}")
    if not os.environ.get("LLAMACONTROLLER_GPU_BACKEND") and (note := choose_gpu_backend(data_dir)):
        notes.append(note)
    return notes


def choose_gpu_backend(data_dir: Path) -> str | None:
    """auto finds no NVIDIA GPU here: run the demo on two simulated GPUs, and say so."""
    sys.path.insert(0, str(REPO))
    from gpus.telemetry import get_backend

    if get_backend("auto").name != "none":
        return None
    fake_file = data_dir / "fake-gpus.json"
    if not fake_file.exists():
        # GPU uuids are unique in the cluster: two simulated hosts on one machine must not share them.
        host = os.environ.get("LLAMACONTROLLER_HOST_NAME") or socket.gethostname().split(".")[0]
        gpus = [
            {
                "index": i,
                "uuid": f"GPU-simulated-{host}-{i}",
                "name": "Simulated GPU (24 GiB)",
                "memory_total_mib": 24564,
                "baseline_used_mib": 5,
                "foreign_processes": [],
                "simulate_load": True,  # utilisation, temperature and power from the models' CPU use
            }
            for i in range(2)
        ]
        fake_file.write_text(json.dumps({"gpus": gpus}, indent=2))
    os.environ["LLAMACONTROLLER_GPU_BACKEND"] = "fake"
    os.environ.setdefault("LLAMACONTROLLER_FAKE_GPUS", str(fake_file))
    return f"no NVIDIA GPU found: using the simulated GPUs in {fake_file} (LLAMACONTROLLER_GPU_BACKEND=fake)"


def migrate() -> None:
    """Django set up and the database migrated (silently: a start may still be refused after this)."""
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)


def prepare_database() -> None:
    collect_static()
    create_admin()
    register_test_model()
    report_llama_server()


def collect_static() -> None:
    """collectstatic, one at a time per checkout. Every start from a checkout writes the same STATIC_ROOT (a
    second data folder, a test run beside a running product), and two at once broke each other's manifest
    step: FileNotFoundError for a hashed file that the other run had just replaced, in 3 of 7
    concurrent pairs tried. The lock is a file beside STATIC_ROOT (inside it, WhiteNoise would serve it)."""
    from django.conf import settings
    from django.core.management import call_command

    root = Path(settings.STATIC_ROOT)
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.with_name(root.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or when this process dies
        call_command("collectstatic", interactive=False, verbosity=0)


def create_admin() -> None:
    from django.contrib.auth.models import Group, User

    if User.objects.filter(is_superuser=True).exists():
        return
    supplied = os.environ.get("LLAMACONTROLLER_ADMIN_PASSWORD")
    password = supplied or secrets.token_urlsafe(12)
    user = User.objects.create_superuser("admin", "admin@localhost", password)
    user.groups.add(Group.objects.get(name="admin"))
    if supplied:
        # The user knows it already; echoing it would put it in terminal scrollback and log files.
        say("created the account 'admin' with the password from LLAMACONTROLLER_ADMIN_PASSWORD")
        return
    say("created the account 'admin' with the password below; it is shown only this once:")
    show(f"\n    username: admin\n    password: {password}\n")


def register_test_model() -> None:
    from django.conf import settings

    from models_app.models import ModelConfig
    from models_app.registry import file_facts
    from models_app.testmodel import write_tiny_model

    path = Path(settings.MODEL_DIRS[0]) / "tiny-test-llama.gguf"
    if not path.exists():
        write_tiny_model(path)
    if not ModelConfig.objects.filter(id="tiny-test-llama").exists():
        ModelConfig.objects.create(
            id="tiny-test-llama",
            name="Tiny test llama (random weights)",
            path=str(path),
            cli_params={"c": 512},
            **file_facts(path),
        )
        say(f"registered the test model {path}")


def report_llama_server() -> None:
    from models_app.binaries import resolve_llama_server

    resolved = resolve_llama_server()
    if resolved.ok:
        say(f"llama-server: {resolved.path}")
    else:
        say(f"WARNING: {resolved.error}. Models cannot be loaded until this is fixed.")


def start_embedded_redis(data_dir: Path):
    """The embedded broker, password-protected: any local user can reach a loopback port, and a queued task
    acts as an admin. The password and the URL (which carries it) are kept in 0600 files, where the
    management commands of another terminal find them. Its port is kept too and reused while free, so that
    a second host's worker (its REDIS_URL) finds it again after a restart."""
    from llamacontroller_site.embedded_redis import EmbeddedRedis, port_is_free

    password = private_secret(data_dir / "embedded-redis.password")
    port_file = data_dir / "embedded-redis.port"
    kept = port_file.read_text().strip() if port_file.is_file() else ""
    port = int(kept) if kept.isdigit() and port_is_free(int(kept)) else None
    server = EmbeddedRedis(password, port=port, log_file=data_dir / "embedded-redis.log").start()
    port_file.write_text(f"{server.port}\n")
    url_file = data_dir / "embedded-redis.url"
    write_private(url_file, server.url)
    say(f"embedded Redis on 127.0.0.1:{server.port} (its URL, with the password, in {url_file}, mode 0600)")
    return server
