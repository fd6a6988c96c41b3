"""The CPU of a gateway request's database work, met cold as a web worker meets it: the in-flight count's UPDATE
on the way in, and the count's end and the usage record on the way out, each after a pause (`--pause-ms`,
llama-server's prompt and answer) in which another connection wrote to the database (another web worker, the
Celery worker), so that SQLite's page cache and the thread's own caches start cold, as in production.

    .venv/bin/python bench/gateway_db.py [--calls 150] [--pause-ms 30] [--checkout /path/to/another/checkout ...]

CPU is the calling thread's own (time.thread_time), the same functions the gateway's database threads call
(models_app.keepalive.request_started / request_finished, gateway.usage.record), on a new SQLite database
(the run command's default). Each checkout (this one, and each `--checkout`) runs in a process of its own on
its own database, driven request by request in turn, so that a change is compared with the code before it
at the same pace of the machine."""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def serve_steps(pause: float) -> None:
    """The child's side: set up, then for each line "in" or "out" on stdin, another connection's write, the
    pause, and that way's work; its CPU (microseconds) printed as one line."""
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth.models import User
    from django.core.management import call_command
    from django.db import connection
    from django.utils import timezone

    from accounts.models import ApiToken
    from gateway import usage
    from gpus.services import register_host
    from models_app import keepalive
    from models_app.models import GpuInstance, ModelConfig

    call_command("migrate", verbosity=0)
    host = register_host(settings.HOST_NAME)
    model = ModelConfig.objects.create(id="bench", name="bench", path="/none.gguf")
    instance = GpuInstance.objects.create(model=model, host=host, gpu_ids="0", status="running", port=1,
                                          api_key="key", pid=1, loaded_at=timezone.now())  # fmt: skip
    user = User.objects.create_user("bench")
    token = ApiToken.issue(user, "bench")[0]

    def record():  # what Exchange._write writes for a streamed answer
        usage.record(user_id=user.pk, token_id=token.pk, model_id="bench", instance_id=instance.pk,
                     endpoint="/v1/chat/completions", status=200, error="", prompt_tokens=12, completion_tokens=1,
                     time_to_first_token_ms=31.2, duration_ms=33.9, client_disconnected=False, throttled="",
                     created_at=timezone.now())  # fmt: skip

    def way_in():
        keepalive.request_started(instance.pk, port=1, api_key="key")

    def way_out():
        keepalive.request_finished(instance.pk)
        record()

    for _ in range(2000):  # a table with some history
        record()
    other = _other_connection(connection)
    print("ready", flush=True)
    for line in sys.stdin:
        work = way_in if line.strip() == "in" else way_out
        other()
        time.sleep(pause)
        started = time.thread_time()
        work()
        print((time.thread_time() - started) * 1e6, flush=True)


def _other_connection(connection):
    """A write by another connection to the same database (a row of its own table), as another process's."""
    import sqlite3

    db = sqlite3.connect(connection.settings_dict["NAME"], isolation_level=None, timeout=20)
    db.execute("CREATE TABLE bench_other (id integer PRIMARY KEY, at text)")
    db.execute("INSERT INTO bench_other (id, at) VALUES (1, '')")
    return lambda: db.execute("UPDATE bench_other SET at = ? WHERE id = 1", (str(time.time()),))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=150, help="requests' database work (default 150)")
    parser.add_argument("--pause-ms", type=float, default=30.0, help="ms before each way (default 30)")
    parser.add_argument("--checkout", type=Path, action="append", default=[],
                        help="another checkout's code (e.g. a git worktree) measured in turn with this one")  # fmt: skip
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        sys.path.insert(0, str(Path.cwd()))
        from load import prepare_environment

        data = Path(tempfile.mkdtemp(prefix="llamacontroller-bench-gateway-db-"))
        os.environ.setdefault("LLAMACONTROLLER_LLAMA_SERVER", "/bin/true")  # never started here
        prepare_environment(data)
        serve_steps(args.pause_ms / 1000)
        return
    children = {}
    for code in [REPO, *args.checkout]:  # a process for each checkout, on its own code and database
        env = dict(os.environ, PYTHONPATH=f"{code.resolve()}{os.pathsep}{REPO / 'bench'}")
        env.pop("DATABASE_URL", None)
        child = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--child", "--pause-ms",
                                  str(args.pause_ms)], cwd=code.resolve(), env=env, text=True,
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE)  # fmt: skip
        assert child.stdout.readline().strip() == "ready"
        children[code.resolve()] = child
    cpu = {code: {"in": [], "out": []} for code in children}
    try:
        for _ in range(args.calls):
            for way in ("in", "out"):
                for code, child in children.items():  # in turn: the machine's pace is shared alike
                    child.stdin.write(way + "\n")
                    child.stdin.flush()
                    cpu[code][way].append(float(child.stdout.readline()))
    finally:
        for child in children.values():
            child.stdin.close()
            child.wait()
    skip = args.calls // 10
    print(
        f"{args.calls} requests per checkout in turn, {args.pause_ms:g} ms pauses; CPU of the calling thread, medians"
    )
    for code, ways in cpu.items():
        way_in, way_out = (statistics.median(ways[w][skip:]) for w in ("in", "out"))
        print(
            f"{str(code):40} way in {way_in:6.0f} us   way out {way_out:6.0f} us   together {way_in + way_out:6.0f} us"
        )


if __name__ == "__main__":
    main()
