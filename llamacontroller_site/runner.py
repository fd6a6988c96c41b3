"""The local run command (`./lc.sh run`): prepares the data folder, database, admin account and test model,
then runs the web server (gunicorn with uvicorn workers, ASGI), a Celery worker, Celery beat and, when REDIS_URL is unset, an embedded
Redis. Ctrl-C stops all of it, the llama-server instances included, and leaves no process behind."""

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from llamacontroller_site.private_files import create_private, private_secret, write_private

REPO = Path(__file__).resolve().parent.parent
BIND = os.environ.get("LLAMACONTROLLER_BIND", "127.0.0.1:8000")


def say(message: str) -> None:
    print(f"[llamacontroller] {message}", flush=True)


def prepare_environment(data_dir: Path) -> None:
    """Everything the settings read must be in place before Django starts."""
    # A new data folder is the owner's alone: it holds the database, the secret key and the Redis password.
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.environ["LLAMACONTROLLER_DATA_DIR"] = str(data_dir)
    key_file = data_dir / "secret_key"
    # 0600 from the first byte (no chmod after the write, so nobody can read it in between).
    if not os.environ.get("SECRET_KEY") and create_private(key_file, secrets.token_urlsafe(50)):
        say(f"generated a secret key in {key_file}")
    if not os.environ.get("LLAMACONTROLLER_GPU_BACKEND"):
        choose_gpu_backend(data_dir)


def choose_gpu_backend(data_dir: Path) -> None:
    """auto finds no NVIDIA GPU here: run the demo on two simulated GPUs, and say so."""
    sys.path.insert(0, str(REPO))
    from gpus.telemetry import get_backend

    if get_backend("auto").name != "none":
        return
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
            }
            for i in range(2)
        ]
        fake_file.write_text(json.dumps({"gpus": gpus}, indent=2))
    os.environ["LLAMACONTROLLER_GPU_BACKEND"] = "fake"
    os.environ.setdefault("LLAMACONTROLLER_FAKE_GPUS", str(fake_file))
    say(f"no NVIDIA GPU found: using the simulated GPUs in {fake_file} (LLAMACONTROLLER_GPU_BACKEND=fake)")


def prepare_database() -> None:
    import django
    from django.core.management import call_command

    django.setup()
    call_command("migrate", interactive=False, verbosity=0)
    call_command("collectstatic", interactive=False, verbosity=0)
    create_admin()
    register_test_model()
    report_llama_server()


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
    print(f"\n    username: admin\n    password: {password}\n", flush=True)


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
    management commands of another terminal find them."""
    from llamacontroller_site.embedded_redis import EmbeddedRedis

    password = private_secret(data_dir / "embedded-redis.password")
    server = EmbeddedRedis(password, log_file=data_dir / "embedded-redis.log").start()
    url_file = data_dir / "embedded-redis.url"
    write_private(url_file, server.url)
    say(f"embedded Redis on 127.0.0.1:{server.port} (its URL, with the password, in {url_file}, mode 0600)")
    return server


def web_command(venv_bin: Path, bind: str = BIND, workers: int = 2) -> list[str]:
    """gunicorn serving the ASGI application with uvicorn workers (Django's documented recipe): streamed
    gateway answers hold no thread; the sync views run in Django's thread pool as before, and WhiteNoise
    serves the static files. Each worker process has its own event loop and its own httpx client.
    Forwarded headers are trusted from no address: uvicorn would otherwise take X-Forwarded-For from any
    local client as the client's address (its default trusts 127.0.0.1). The client's address is the socket
    peer, or what LLAMACONTROLLER_PROXY_COUNT trusted proxies wrote (accounts.throttle.client_ip)."""
    return [
        str(venv_bin / "gunicorn"), "llamacontroller_site.asgi:application", "-k", "uvicorn_worker.UvicornWorker",
        "-b", bind, "-w", str(workers), "--access-logfile", "-", "--forwarded-allow-ips=",
        # A stream lasts as long as its answer: gunicorn's timeout is the worker heartbeat, not a request limit.
        "--graceful-timeout", "10",
    ]  # fmt: skip


class Supervisor:
    def __init__(self):
        self.children: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str]) -> None:
        # Each child in its own session: Ctrl-C reaches only this supervisor, which stops them in order.
        self.children[name] = subprocess.Popen(argv, cwd=REPO, start_new_session=True)

    def first_exited(self) -> str | None:
        return next((name for name, p in self.children.items() if p.poll() is not None), None)

    def stop(self, name: str, timeout: float = 15.0) -> None:
        process = self.children.get(name)
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass


def stop_instances() -> None:
    """The product stops as a whole: unload this host's models. Their processes outlive a worker by design,
    so that a worker restart does not kill them; a Ctrl-C of the whole product should."""
    from django.conf import settings

    from models_app.lifecycle import unload_instance
    from models_app.models import GpuInstance

    active = GpuInstance.objects.filter(
        host__name=settings.HOST_NAME, status__in=GpuInstance.ACTIVE_STATUSES
    ).values_list("id", flat=True)
    for instance_id in active:
        unload_instance(instance_id)
        say(f"unloaded instance {instance_id}")


def run_worker() -> int:
    """`./lc.sh worker`: this machine joins a cluster as a GPU host. Only its worker runs here, on the queue
    host.<LLAMACONTROLLER_HOST_NAME>, against the cluster's database and Redis (DATABASE_URL and REDIS_URL
    must name them: an embedded database or broker would be a cluster of one). The web node migrates."""
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    missing = [name for name in ("DATABASE_URL", "REDIS_URL") if not os.environ.get(name)]
    if missing:
        say(
            f"a GPU host's worker needs the cluster's {' and '.join(missing)} (see README, 'Several GPU hosts')"
        )
        return 2
    data_dir = Path(os.environ.get("LLAMACONTROLLER_DATA_DIR", REPO / "data")).resolve()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llamacontroller_site.settings")
    prepare_environment(data_dir)
    import django

    django.setup()
    from django.conf import settings

    say(f"worker for host {settings.HOST_NAME} (queue {settings.HOST_QUEUE}); Ctrl-C stops it")
    # exec: signals reach Celery itself; the llama-servers it started outlive it (and are adopted by the next).
    argv = [sys.executable, "-m", "celery", "-A", "llamacontroller_site", "worker", "-Q", settings.HOST_QUEUE,
            "-n", f"{settings.HOST_NAME}@%h", "-c", "4", "-l", "INFO"]  # fmt: skip
    os.execv(sys.executable, argv)


def main() -> int:
    if sys.argv[1:2] == ["worker"]:
        return run_worker()
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    data_dir = Path(os.environ.get("LLAMACONTROLLER_DATA_DIR", REPO / "data")).resolve()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llamacontroller_site.settings")
    prepare_environment(data_dir)

    redis_server = None
    url_file = data_dir / "embedded-redis.url"
    if not os.environ.get("REDIS_URL"):
        redis_server = start_embedded_redis(data_dir)
        os.environ["REDIS_URL"] = redis_server.url

    supervisor = Supervisor()
    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, request_stop)
    signal.signal(signal.SIGTERM, request_stop)
    try:
        prepare_database()
        from django.conf import settings

        venv_bin = Path(sys.executable).parent
        celery = [sys.executable, "-m", "celery", "-A", "llamacontroller_site"]
        supervisor.start(
            "web",
            web_command(venv_bin),
        )  # fmt: skip
        supervisor.start(
            "worker",
            celery + ["worker", "-Q", f"default,{settings.HOST_QUEUE}", "-n", f"{settings.HOST_NAME}@%h",
                      "-c", "4", "-l", "INFO"],
        )  # fmt: skip
        supervisor.start("beat", celery + ["beat", "-l", "INFO", "-s", str(data_dir / "celerybeat-schedule")])
        say(f"LlamaController is running on http://{BIND}/  (Ctrl-C stops everything)")
        while not stopping:
            exited = supervisor.first_exited()
            if exited:
                say(f"{exited} exited with code {supervisor.children[exited].returncode}; stopping")
                break
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        say("stopping…")
        supervisor.stop("beat")
        supervisor.stop("web")
        try:
            stop_instances()
        except Exception as exc:  # shutting down: report and go on stopping the rest
            say(f"could not stop model instances cleanly: {exc}")
        supervisor.stop("worker", timeout=30)
        if redis_server:
            redis_server.stop()
            url_file.unlink(missing_ok=True)
        say("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
