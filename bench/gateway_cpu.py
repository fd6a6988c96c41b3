"""The gateway's own CPU per streamed chunk and per request, with a stand-in llama-server that costs nothing to
ask: it answers every chat completion with `--tokens` SSE chunks `--gap` ms apart, chunked as cpp-httplib
sends them, and the last chunk with llama-server's `timings` and `usage`. Several checkouts of the code can
run side by side (each its own web worker on the same database), beside the raw relay of bench/proxies.py and
the stand-in itself, every path in turn, so that a before/after comparison shares the machine's load.

    .venv/bin/python bench/gateway_cpu.py [--requests 40] [--rounds 5] [--tokens 64] [--gap 2] [--prompt-ms 0]
                                          [--ollama]
                                          [--checkout /path/to/another/checkout ...]

CPU is read from /proc of each web worker (and of the relay) around each batch of `--requests` requests; the
chunk's share is the difference between `--tokens`-token and 1-token answers over the difference in chunks.
No Celery worker, no llama-server: the instance row points at the stand-in."""

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import proxies  # noqa: E402
from load import prepare_environment  # noqa: E402

_CHUNK = {"choices": [{"finish_reason": None, "index": 0, "delta": {"content": ""}}], "created": 1765000000,
          "id": "chatcmpl-bench", "model": "gemma3-270m", "system_fingerprint": "b1-bench",
          "object": "chat.completion.chunk"}  # fmt: skip
_TIMINGS = {"cache_n": 0, "prompt_n": 12, "prompt_ms": 5.0, "predicted_n": 64, "predicted_ms": 100.0}


def _event(text: str | None) -> bytes:
    event = json.loads(json.dumps(_CHUNK))
    if text is None:  # the last one: finish reason, usage and timings, as llama-server sends them
        event["choices"][0].update(finish_reason="length", delta={})
        event.update(
            usage={"completion_tokens": 64, "prompt_tokens": 12, "total_tokens": 76}, timings=_TIMINGS
        )
    else:
        event["choices"][0]["delta"]["content"] = text
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def _chunked(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


async def stand_in(port_box: list, ready: threading.Event, gap: float, prompt: float = 0.0) -> None:
    async def serve(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)  # fmt: skip
                body = await reader.readexactly(length) if length else b""
                if head.split(b" ")[1] == b"/props":
                    answer = b'{"total_slots": 64}'
                    writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                                 % (len(answer), answer))  # fmt: skip
                    continue
                tokens = json.loads(body).get("max_tokens") or json.loads(body).get("n_predict") or 1
                if prompt:
                    await asyncio.sleep(prompt / 1000)
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
                )
                for n in range(tokens):
                    writer.write(_chunked(_event(f" word{n}")))
                    await writer.drain()
                    await asyncio.sleep(gap / 1000)
                writer.write(_chunked(_event(None)) + _chunked(b"data: [DONE]\n\n") + b"0\r\n\r\n")
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port_box.append(server.sockets[0].getsockname()[1])
    ready.set()
    await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=40, help="requests per path and batch (default 40)")
    parser.add_argument("--rounds", type=int, default=5, help="batches per path, in turn (default 5)")
    parser.add_argument("--tokens", type=int, default=64, help="chunks per long answer (default 64)")
    parser.add_argument("--gap", type=float, default=2.0, help="ms between the stand-in's chunks (default 2)")
    parser.add_argument("--prompt-ms", type=float, default=0.0,
                        help="ms before the answer's head, as llama-server's prompt takes (Gemma's ~30 ms: the "
                             "worker waits idle, and its caches go cold; default 0)")  # fmt: skip
    parser.add_argument("--ollama", action="store_true", help="the gateway's /api/generate instead of /v1")
    parser.add_argument(
        "--idle", type=float, default=5.0, help="seconds each path's idle CPU is read (default 5)"
    )
    parser.add_argument("--checkout", type=Path, action="append", default=[],
                        help="another checkout of the code (its own web worker), e.g. `git worktree` of main")  # fmt: skip
    args = parser.parse_args()

    port_box, ready = [], threading.Event()
    threading.Thread(
        target=lambda: asyncio.run(stand_in(port_box, ready, args.gap, args.prompt_ms)), daemon=True
    ).start()
    ready.wait(10)
    upstream = port_box[0]
    data = Path(tempfile.mkdtemp(prefix="llamacontroller-bench-gateway-cpu-"))
    os.environ.setdefault("LLAMACONTROLLER_LLAMA_SERVER", "/bin/true")  # never started here
    prepare_environment(data)

    import django

    django.setup()
    import httpx
    import psutil
    from django.conf import settings
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command
    from django.utils import timezone

    from accounts.models import ApiToken
    from gpus.services import register_host
    from models_app.models import GpuInstance, ModelConfig

    call_command("migrate", verbosity=0)
    host = register_host(settings.HOST_NAME)
    model = ModelConfig.objects.create(id="gemma3-270m", name="stand-in", path=str(data / "none.gguf"))
    GpuInstance.objects.bulk_create([GpuInstance(model=model, host=host, gpu_ids="0", status="running", port=upstream,
                                                 api_key="key", pid=os.getpid(), loaded_at=timezone.now())])  # fmt: skip
    user = User.objects.create_user("bench")
    user.groups.add(Group.objects.get(name="operator"))
    auth = {"Authorization": f"Bearer {ApiToken.issue(user, 'bench')[1]}"}

    logs = open(data / "processes.log", "ab")  # noqa: SIM115
    started, paths = [], {}
    try:  # every process started is stopped, whatever fails
        for n, checkout in enumerate([REPO, *args.checkout]):
            port = 18300 + n
            web = subprocess.Popen(proxies.web_command(checkout, f"127.0.0.1:{port}") + ["--access-logfile", "/dev/null"],
                                   cwd=checkout, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
            started.append(web)
            proxies.wait_for(f"http://127.0.0.1:{port}/api/version")
            paths[f"gateway {checkout}"] = (
                f"http://127.0.0.1:{port}",
                auth,
                psutil.Process(web.pid).children()[0].pid,
            )
        if not args.ollama:
            started.append(proxies.start_relay(18399, upstream, logs))
            proxies.wait_for("http://127.0.0.1:18399/props")
            paths["relay"] = ("http://127.0.0.1:18399", {}, started[-1].pid)
            paths["stand-in (direct)"] = (f"http://127.0.0.1:{upstream}", {}, None)

        logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
        client = httpx.Client(trust_env=False, timeout=60)

        def ask(base: str, headers: dict, tokens: int) -> float:
            if args.ollama:
                url, body = (
                    base + "/api/generate",
                    {"model": "gemma3-270m", "prompt": "hi", "options": {"num_predict": tokens}},
                )
            else:
                url = base + "/v1/chat/completions"
                body = {"model": "gemma3-270m", "messages": [{"role": "user", "content": "hi"}], "stream": True,
                        "max_tokens": tokens}  # fmt: skip
            sent = time.perf_counter()
            first = None
            with client.stream("POST", url, json=body, headers=headers) as response:
                assert response.status_code == 200, response.read()
                for _ in response.iter_raw():
                    first = first or time.perf_counter() - sent
            return first

        for base, headers, _ in paths.values():
            for _ in range(5):
                ask(base, headers, args.tokens)
        # What each path's process burns with nothing to do (uvicorn's housekeeping tick, say): over a slow
        # stream's long answers it is counted into the chunks' share, printed so that it can be told apart.
        idle = {}
        for name, (_, _, pid) in paths.items():
            before, started_at = proxies.cpu_seconds([pid] if pid else []), time.perf_counter()
            time.sleep(args.idle)
            idle[name] = (proxies.cpu_seconds([pid] if pid else []) - before) / (
                time.perf_counter() - started_at
            )
        cpu = {name: {args.tokens: [], 1: []} for name in paths}
        seconds = {name: {args.tokens: [], 1: []} for name in paths}
        firsts = {name: [] for name in paths}
        for _ in range(args.rounds):
            for name, (base, headers, pid) in paths.items():
                for tokens in (args.tokens, 1):
                    before = proxies.cpu_seconds([pid] if pid else [])
                    started_at = time.perf_counter()
                    times = [ask(base, headers, tokens) for _ in range(args.requests)]
                    seconds[name][tokens].append((time.perf_counter() - started_at) / args.requests)
                    cpu[name][tokens].append(
                        (proxies.cpu_seconds([pid] if pid else []) - before) / args.requests
                    )
                    if tokens == 1:
                        firsts[name] += times
        print(f"{args.tokens} chunks {args.gap:g} ms apart after {args.prompt_ms:g} ms, {args.requests} requests x {args.rounds} rounds per path, "
              f"{'/api/generate' if args.ollama else '/v1/chat/completions'}; load average {os.getloadavg()[0]:.1f}")  # fmt: skip
        print(f"{'path':<50} {'CPU/request ms':>14} {'1 token ms':>10} {'per chunk us':>12} {'first byte ms':>13} "
              f"{'idle us/s':>9} {'chunk less idle us':>18}")  # fmt: skip
        for name in paths:
            long, short = statistics.median(cpu[name][args.tokens]), statistics.median(cpu[name][1])
            per_chunk = (long - short) / (args.tokens - 1)
            # the idle rate over the long answer's extra time, taken out of its chunks
            extra = statistics.median(seconds[name][args.tokens]) - statistics.median(seconds[name][1])
            net = per_chunk - idle[name] * extra / (args.tokens - 1)
            print(f"{name[-50:]:<50} {long * 1000:>14.2f} {short * 1000:>10.2f} {per_chunk * 1e6:>12.1f} "
                  f"{statistics.median(firsts[name]) * 1000:>13.2f} {idle[name] * 1e6:>9.0f} {net * 1e6:>18.1f}")  # fmt: skip
    finally:
        for process in started:
            process.terminate()


if __name__ == "__main__":
    main()
