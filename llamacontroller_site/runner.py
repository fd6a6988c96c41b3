"""The local run command (`./lc.sh run`): prepares the data folder, database, admin account and test model
(llamacontroller_site/first_run.py), then runs the web server (gunicorn with uvicorn workers, ASGI), a Celery worker,
Celery beat and, when REDIS_URL is unset, an embedded Redis. Ctrl-C, SIGTERM and SIGHUP (the terminal closed) stop all
of it, the llama-server instances included (llamacontroller_site/host_instances.py), and leave no process behind; so
does the run command's death by any other signal (llamacontroller_site/supervision.py). One run per data folder, and
none for a host name that a live worker holds: a refused start touches nothing.

`./lc.sh manage <command>` runs manage.py with the same environment (data folder, embedded Redis, GPUs)."""

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

from llamacontroller_site.first_run import (
    REPO,
    migrate,
    prepare_database,
    prepare_environment,
    start_embedded_redis,
)
from llamacontroller_site.host_instances import host_name_holder, stop_instances, worker_claimed
from llamacontroller_site.supervision import (
    AlreadyRunning,
    Supervisor,
    Watchdog,
    keep_redis_up,
    lock_data_folder,
    say,
    watch,
)

BIND = os.environ.get("LLAMACONTROLLER_BIND", "127.0.0.1:8000")
USAGE = "usage: ./lc.sh run | worker | manage COMMAND [ARGS] | test [pytest arguments]"


def web_command(venv_bin: Path, bind: str = BIND, workers: int = 2) -> list[str]:
    """gunicorn serving the ASGI application with uvicorn workers (Django's documented recipe): streamed
    gateway answers hold no thread; the sync views run in Django's thread pool as before, and WhiteNoise
    serves the static files. Each worker process has its own event loop and its own httpx client.
    Forwarded headers are trusted from no address: uvicorn would otherwise take X-Forwarded-For from any
    local client as the client's address (its default trusts 127.0.0.1). The client's address is the socket
    peer, or what LLAMACONTROLLER_PROXY_COUNT trusted proxies wrote (accounts.throttle.client_ip)."""
    return [
        str(venv_bin / "gunicorn"), "llamacontroller_site.asgi:application",
        "-k", "llamacontroller_site.web_worker.UvicornWorker",  # uvicorn's, its housekeeping once a second
        "-b", bind, "-w", str(workers), "--access-logfile", "-", "--forwarded-allow-ips=",
        # A stream lasts as long as its answer: gunicorn's timeout is the worker heartbeat, not a request limit.
        "--graceful-timeout", "10",
    ]  # fmt: skip


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
                # Celery's worker dies on some broker losses (kombu restoring unacknowledged messages on a
                # dead connection): started again, as systemd's Restart= would, rather than stopping all.
                restarted = supervisor.restart_exited(exited)
                if restarted is None:
                    break
                if exited == "worker":
                    worker, claimed = restarted, False  # the watchdog is told the new worker's pid
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
