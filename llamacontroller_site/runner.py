"""The local run command (`./lc.sh run`): prepares the data folder, database, admin account and test model,
then runs the web server (gunicorn with uvicorn workers, ASGI), a Celery worker, Celery beat and, when REDIS_URL is unset, an embedded
Redis. Ctrl-C, SIGTERM and SIGHUP (the terminal closed) stop all of it, the llama-server instances included, and
leave no process behind; so does the run command's death by any other signal (llamacontroller_site/supervision.py).
One run per data folder, and none for a host name that a live worker holds: a refused start touches nothing.

`./lc.sh manage <command>` runs manage.py with the same environment (data folder, embedded Redis, GPUs)."""

import contextlib
import json
import os
import secrets
import signal
import socket
import sys
import time
from pathlib import Path

from llamacontroller_site.private_files import create_private, private_secret, write_private
from llamacontroller_site.supervision import (
    AlreadyRunning,
    Supervisor,
    Watchdog,
    keep_redis_up,
    lock_data_folder,
    say,
    show,
    watch,
)

REPO = Path(__file__).resolve().parent.parent
BIND = os.environ.get("LLAMACONTROLLER_BIND", "127.0.0.1:8000")
USAGE = "usage: ./lc.sh run | worker | manage COMMAND [ARGS] | test [pytest arguments]"


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


def host_name_holder() -> str | None:
    """Who holds this host's name, when a live worker other than one of this run does. Read-only: the claim
    itself is the worker's (models_app/cluster.py)."""
    from django.conf import settings

    from gpus.models import Host
    from models_app import cluster

    host = Host.objects.filter(name=settings.HOST_NAME).first()
    return cluster._held_by_other(host, cluster.this_worker()) if host else None


def prepare_database() -> None:
    from django.core.management import call_command

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


def retrying(action):
    """A database action that survives a dropped connection (a database restart, pg_terminate_backend):
    the broken connection is closed and the action tried once more on a new one."""
    from django.db import InterfaceError, OperationalError, connections

    try:
        return action()
    except (OperationalError, InterfaceError):
        connections.close_all()
        return action()


def worker_claimed(worker_pid: int) -> bool:
    """Whether this run's worker holds the host name (or held it until it died): only then are the host's
    instances this run's to stop."""
    from django.conf import settings

    from gpus.models import Host
    from models_app import cluster

    mine = Host.objects.filter(
        name=settings.HOST_NAME, worker_pid=worker_pid, worker_machine_id=cluster.machine_id()
    )
    return retrying(mine.exists)


def stop_instances() -> None:
    """The product stops as a whole: unload this host's models. Their processes outlive a worker by design,
    so that a worker restart does not kill them; a Ctrl-C of the whole product should."""
    from django.conf import settings
    from django.db import connections

    from models_app.lifecycle import unload_instance
    from models_app.models import GpuInstance

    # This process's connection has been idle since the start, and may have been dropped meanwhile.
    connections.close_all()
    mine = GpuInstance.objects.filter(host__name=settings.HOST_NAME, status__in=GpuInstance.ACTIVE_STATUSES)
    for instance_id in retrying(lambda: list(mine.values_list("id", flat=True))):
        unload_instance(instance_id)  # survives a dropped connection itself
        status = retrying(GpuInstance.objects.filter(pk=instance_id).values_list("status", flat=True).first)
        say(f"instance {instance_id}: {status}")


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
    for note in prepare_environment(data_dir):
        say(note)
    import django

    django.setup()
    from django.conf import settings

    say(f"worker for host {settings.HOST_NAME} (queue {settings.HOST_QUEUE}); Ctrl-C stops it")
    # exec: signals reach Celery itself; the llama-servers it started outlive it (and are adopted by the next).
    argv = [sys.executable, "-m", "celery", "-A", "llamacontroller_site", "worker", "-Q", settings.HOST_QUEUE,
            "-n", f"{settings.HOST_NAME}@%h", "-c", "4", "-l", "INFO"]  # fmt: skip
    os.execv(sys.executable, argv)


def run_manage(args: list[str]) -> int:
    """`./lc.sh manage <command>`: manage.py with the run command's environment: its data folder (database,
    secret key), its embedded Redis (settings read data/embedded-redis.url) and its simulated GPUs."""
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    data_dir = Path(os.environ.get("LLAMACONTROLLER_DATA_DIR", REPO / "data")).resolve()
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llamacontroller_site.settings")
    prepare_environment(data_dir)  # its notes are the run command's to show; here only the command speaks
    os.execv(sys.executable, [sys.executable, str(REPO / "manage.py"), *args])


def run_watchdog(read_end: int, runner_pid: int) -> int:
    """The watchdog process (supervision.watch); Django is set up only if there is something to stop."""
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))

    def stop() -> None:
        import django

        django.setup()
        stop_instances()

    return watch(read_end, runner_pid, stop)


def run() -> int:
    """`./lc.sh run`: everything on this machine, until Ctrl-C."""
    os.chdir(REPO)
    sys.path.insert(0, str(REPO))
    data_dir = Path(os.environ.get("LLAMACONTROLLER_DATA_DIR", REPO / "data")).resolve()
    try:
        lock = lock_data_folder(data_dir)  # held, by this open file, until the process ends
    except AlreadyRunning as exc:
        say(
            f"refusing to start: another ./lc.sh run (pid {exc}) runs with the data folder {data_dir} (or its "
            "watchdog is stopping what it left). Stop that one first (Ctrl-C in its terminal), or give this one "
            "its own LLAMACONTROLLER_DATA_DIR.",
            err=True,
        )
        return 1
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llamacontroller_site.settings")
    notes = prepare_environment(data_dir)
    migrate()
    from django.conf import settings
    from django.db import DatabaseError

    holder = host_name_holder()
    if holder:
        say(
            f"refusing to start: host name {settings.HOST_NAME!r} is held by another worker: {holder}. Stop "
            "it, or give this run its own LLAMACONTROLLER_HOST_NAME.",
            err=True,
        )
        return 1
    for note in notes:
        say(note)

    stopping = False

    def request_stop(signum, frame):
        nonlocal stopping
        stopping = True

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, request_stop)
    supervisor = Supervisor()
    redis_server = watchdog = worker = None
    claimed = False
    url_file = data_dir / "embedded-redis.url"
    # From here on, whatever happens (an error, a closed terminal), the finally stops what was started.
    try:
        if not os.environ.get("REDIS_URL"):
            redis_server = start_embedded_redis(data_dir)
            os.environ["REDIS_URL"] = redis_server.url
        prepare_database()
        if stopping:
            return 0
        # Started before the worker: whatever the worker starts, the watchdog can stop.
        watchdog = Watchdog(data_dir / "watchdog.log", lock)
        venv_bin = Path(sys.executable).parent
        celery = [sys.executable, "-m", "celery", "-A", "llamacontroller_site"]
        supervisor.start(
            "web",
            web_command(venv_bin),
        )  # fmt: skip
        worker = supervisor.start(
            "worker",
            celery + ["worker", "-Q", f"default,{settings.HOST_QUEUE}", "-n", f"{settings.HOST_NAME}@%h",
                      "-c", "4", "-l", "INFO"],
        )  # fmt: skip
        supervisor.start("beat", celery + ["beat", "-l", "INFO", "-s", str(data_dir / "celerybeat-schedule")])
        say(f"LlamaController is running on http://{BIND}/  (Ctrl-C stops everything)")
        redis_restarts: list[float] = []
        while not stopping:
            exited = supervisor.first_exited()
            if exited:
                say(f"{exited} exited with code {supervisor.children[exited].returncode}; stopping")
                break
            if redis_server and not keep_redis_up(redis_server, redis_restarts):
                break
            with contextlib.suppress(DatabaseError):  # the database away a moment: asked again next turn
                if not claimed and worker_claimed(worker.pid):
                    claimed = True
                    watchdog.tell(f"claimed {worker.pid}")
            time.sleep(0.5)
    finally:
        for sig in (signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        say("stopping…")
        supervisor.stop("beat")
        supervisor.stop("web")
        try:
            # Only what this run's worker managed: a worker refused the host name stopped before taking any.
            if worker and (claimed or worker_claimed(worker.pid)):
                stop_instances()
        except Exception as exc:  # shutting down: report and go on stopping the rest
            say(f"could not stop model instances cleanly: {exc}")
        supervisor.stop("worker", timeout=30)
        if redis_server:
            redis_server.stop()
            url_file.unlink(missing_ok=True)
        if watchdog:
            watchdog.done()
        say("stopped")
    return 0


def main() -> int:
    command, args = (sys.argv[1], sys.argv[2:]) if len(sys.argv) > 1 else ("run", [])
    if command == "worker":
        return run_worker()
    if command == "manage":
        return run_manage(args)
    if command == "watchdog":
        return run_watchdog(int(args[0]), int(args[1]))
    if command != "run" or args:
        say(USAGE, err=True)
        return 2
    return run()


if __name__ == "__main__":
    sys.exit(main())
