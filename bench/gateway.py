"""The gateway's cost: Gemma 3 270M (Q4_K_M) through the gateway against straight to its llama-server, and
against the floor for a Python proxy (a raw asyncio TCP relay, bench/proxies.py) and, with --litellm, LiteLLM's
proxy.

    .venv/bin/python bench/gateway.py [--pairs 30] [--tokens 64] [--model gemma|tiny] [--no-repack]
                                      [--litellm /tmp/litellm-venv/bin/litellm] [--no-cold] [--no-memory]
                                      [--checkout /path/to/another/checkout ...]

(The registry id is `gemma3-270m` whichever file serves it.)

- one stream at a time, every path in turn with the same prompts (the order turning each round): direct, the
  gateway's OpenAI route (passed through), the relay, LiteLLM, the gateway's Ollama /api/generate (translated);
  `--tokens` tokens and then 1 token per answer. For each path: tokens/s after the first token (and its ratio
  to direct), time to first token, its overhead over direct with 1 token (median of the rounds' differences),
  and the CPU of the path's own processes read from /proc around each request (the web worker; the relay; the
  LiteLLM process tree): per request with `--tokens` and with 1 token (the fixed cost), and per streamed chunk
  (the difference over the difference in chunks);
- `--streams` concurrent streams (aggregate tokens/s) on each OpenAI-shaped path, `--concurrent-runs` times in
  turn; then 64 concurrent streams through the gateway (one web worker) and their answers' status counts;
- the web worker's memory (RSS) idle and with `--open` open streams;
- cold start: a request for an unloaded model -> first token (load on demand through the real worker),
  against a bare llama-server start + first token.

`--checkout` adds another checkout's gateway (its own web worker, on the same database and instance) as one
more OpenAI path, "gateway /v1 @<folder>", interleaved with the others: a before/after comparison in the same
rounds, on the same llama-server.

LiteLLM is not a requirement: install it into a virtual environment of its own, e.g.
`python -m venv /tmp/litellm && /tmp/litellm/bin/pip install 'litellm[proxy]'`.

    .venv/bin/python bench/gateway.py --rounds 5 [--streams 16] [--pause 1] [--model gemma|tiny]

runs only the load case instead: the model served with `-np 4` and the web app with two workers (as the run
command has), `--streams` concurrent streams for `--rounds` rounds, `--pause` seconds apart (kept-alive upstream
connections idle meanwhile), through the gateway and straight to llama-server; it prints the answers' status
counts and the 5xx among them (the issue saw 4 of 80 answer 502 "Server disconnected without sending a response").

The web app runs as the run command runs it (gunicorn with one uvicorn worker), with a real Celery worker,
a temporary SQLite database and an embedded Redis; GPUs are simulated, llama-server runs on the CPU."""

import argparse
import json
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

import proxies  # noqa: E402  (bench/proxies.py: the relay and LiteLLM beside the gateway)
from load import gemma_file, prepare_environment, start_broker, wait_running  # noqa: E402  (bench/load.py: the same set-up)

PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle stays upright.",
    "List some facts about the moon.",
    "Describe a walk through a forest in autumn.",
]


def parse_args():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pairs", type=int, default=30, help="interleaved gateway/direct pairs (default 30)")
    parser.add_argument("--tokens", type=int, default=64, help="tokens per answer (default 64)")
    parser.add_argument("--streams", type=int, default=16, help="concurrent streams (default 16)")
    parser.add_argument(
        "--open", type=int, default=100, help="open streams for the memory figure (default 100)"
    )
    parser.add_argument(
        "--rounds", type=int, default=0,
        help="only the load case: --streams concurrent streams this many rounds, model with -np 4, 2 web workers",
    )  # fmt: skip
    parser.add_argument(
        "--litellm", type=Path, default=None,
        help="LiteLLM's `litellm` command in a virtual environment of its own: also its proxy as a path",
    )  # fmt: skip
    parser.add_argument(
        "--concurrent-runs", type=int, default=2, help="runs of the concurrent streams (default 2)"
    )
    parser.add_argument("--checkout", type=Path, action="append", default=[],
                        help="another checkout of the code (its own web worker) as one more path, e.g. `git "
                        "worktree` of main")  # fmt: skip
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-start figures")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory with --open open requests")
    parser.add_argument("--pause", type=float, default=1.0, help="seconds between load rounds (default 1)")
    parser.add_argument(
        "--no-repack", action="store_true",
        help="serve with llama-server's -nr (no weight repacking): needed where the CPU advertises AMX that "
        "the VM does not allow (llama-server dies with SIGILL on Gemma otherwise; see the README)",
    )  # fmt: skip
    parser.add_argument(
        "--model", choices=["gemma", "tiny"], default="gemma",
        help="Gemma 3 270M Q4_K_M (default) or the tiny test model (F32; thousands of tokens/s, so the "
        "gateway's share of each token is at its largest)",
    )  # fmt: skip
    return parser.parse_args()


def stream(client, url: str, headers: dict, body: dict, ollama: bool = False) -> tuple[float, float, int]:
    """(time to first token, tokens/s after it, tokens) of one streamed answer, measured by the client."""
    started = time.perf_counter()
    first = last = None
    tokens = 0
    with client.stream("POST", url, json=body, headers=headers, timeout=600) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if ollama:
                if not line:
                    continue
                chunk = json.loads(line)
                if chunk.get("done"):
                    break
                got = bool(chunk.get("response"))
            else:
                if not line.startswith("data: {"):
                    continue
                delta = json.loads(line[6:])["choices"][0].get("delta") or {}
                got = bool(delta.get("content"))
            if got:
                now = time.perf_counter()
                first = first or now
                last = now
                tokens += 1
    ttft = (first or time.perf_counter()) - started
    rate = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return ttft, rate, tokens, (last or time.perf_counter()) - started


def openai_body(prompt: str, tokens: int) -> dict:
    return {"model": "gemma3-270m", "messages": [{"role": "user", "content": prompt}], "stream": True,
            "max_tokens": tokens, "ignore_eos": True, "temperature": 0, "seed": 1}  # fmt: skip


def ollama_body(prompt: str, tokens: int) -> dict:
    return {
        "model": "gemma3-270m",
        "prompt": prompt,
        "options": {"num_predict": tokens, "temperature": 0, "seed": 1},
    }


def med(values) -> float:
    return statistics.median(values)


def load_rounds(url: str, headers: dict, streams: int, rounds: int, tokens: int, pause: float):
    """`streams` concurrent streams, `rounds` times: the count of each outcome (an HTTP status, "200+error" for a
    stream that ended with an error event, or the client's exception), and the first error bodies."""
    import collections
    import logging

    import httpx

    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    outcomes, errors, lock = collections.Counter(), [], threading.Lock()

    def one(n):
        try:
            with (
                httpx.Client(trust_env=False, timeout=600) as own,
                own.stream(
                    "POST", url, json=openai_body(PROMPTS[n % 4], tokens), headers=headers
                ) as response,
            ):
                body = b"".join(response.iter_raw())
                outcome = response.status_code
                if outcome == 200 and b'"error"' in body:
                    outcome = "200+error"
        except httpx.HTTPError as exc:
            outcome, body = type(exc).__name__, str(exc).encode()
        with lock:
            outcomes[outcome] += 1
            if outcome != 200 and len(errors) < 5:
                errors.append(f"{outcome}: {body[-300:].decode(errors='replace').strip()}")

    for round_ in range(rounds):
        if round_:
            time.sleep(pause)
        threads = [threading.Thread(target=one, args=(n,)) for n in range(streams)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    return outcomes, errors


def report_load(name: str, outcomes, errors, streams: int, rounds: int) -> None:
    server_errors = sum(n for k, n in outcomes.items() if isinstance(k, int) and k >= 500)
    counts = ", ".join(f"{k}: {n}" for k, n in sorted(outcomes.items(), key=str))
    print(f"{name:<12} {streams} streams x {rounds} rounds: {counts}; 5xx: {server_errors}", flush=True)
    for error in errors:
        print(f"    {error}")


def interleaved(client, paths: dict, pairs: int, tokens: int) -> dict:
    """`pairs` rounds of one request per path, the order turning each round: (ttft, rate, tokens, CPU seconds
    of the path's processes during the request) per path."""
    rows = {name: [] for name in paths}
    names = list(paths)
    for n in range(pairs):
        prompt = PROMPTS[n % len(PROMPTS)]
        for name in names[n % len(names) :] + names[: n % len(names)]:
            url, headers, is_ollama, pids = paths[name]
            body = ollama_body(prompt, tokens) if is_ollama else openai_body(prompt, tokens)
            before = proxies.cpu_seconds(pids)
            ttft, rate, got, answer = stream(client, url, headers, body, ollama=is_ollama)
            rows[name].append((ttft, rate, got, proxies.cpu_seconds(pids) - before, answer))
    return rows


def report_paths(runs: dict, tokens: int) -> None:
    """The table of the interleaved runs: first token, tokens/s, and CPU per request and per chunk of each
    path's own processes (the chunk's share: the difference between the long and the 1-token answers).
    Tokens/s is the whole answer's (its tokens over the time from sending to its last token): a proxy that
    passes several tokens on at once makes the rate after the first token look higher than it is."""
    long, short = runs[tokens], runs[1]
    pairs = len(long["direct /v1"])
    print(f"\none stream at a time: {pairs} interleaved rounds of {tokens} tokens and of 1 token, medians; CPU from "
          "/proc of the path's processes (each thread's run time: per request as the mean over all requests)")  # fmt: skip
    print(f"{'path':<30} {'tokens/s':>9} {'x direct':>8} {'TTFT ms':>8} {'+TTFT 1 tok':>11} {'CPU/req ms':>10} "
          f"{'CPU 1 tok':>9} {'CPU/chunk us':>12}")  # fmt: skip
    direct_rate = med(r[2] / r[4] for r in long["direct /v1"])
    for name in long:
        rate = med(r[2] / r[4] for r in long[name])
        over = med(s[0] - d[0] for s, d in zip(short[name], short["direct /v1"], strict=True)) * 1000
        cpu_long = statistics.mean(r[3] for r in long[name]) * 1000
        cpu_short = statistics.mean(r[3] for r in short[name]) * 1000
        chunks = statistics.mean(r[2] for r in long[name]) - statistics.mean(r[2] for r in short[name])
        per_chunk = (cpu_long - cpu_short) / chunks * 1000 if chunks > 0 else 0.0
        print(f"{name:<30} {rate:>9.1f} {rate / direct_rate:>8.3f} {med(r[0] for r in long[name]) * 1000:>8.1f} "
              f"{over:>11.2f} {cpu_long:>10.2f} {cpu_short:>9.2f} {per_chunk:>12.1f}")  # fmt: skip


def concurrent(url: str, headers: dict, streams: int, tokens: int) -> float:
    """`streams` streams at once: the tokens of all of them over the wall time."""
    import httpx

    out = []

    def one(n):
        with httpx.Client(trust_env=False, timeout=600) as own:
            out.append(stream(own, url, headers, openai_body(PROMPTS[n % 4], tokens)))

    threads = [threading.Thread(target=one, args=(n,)) for n in range(streams)]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(r[2] for r in out) / (time.perf_counter() - started)


def main() -> None:
    args = parse_args()
    data = Path(tempfile.mkdtemp(prefix="llamacontroller-bench-gateway-"))
    prepare_environment(data)
    os.environ["LLAMACONTROLLER_GATEWAY_QUEUE_SIZE"] = str(args.open + 16)
    redis_server = start_broker(data)

    import django

    django.setup()
    import httpx
    import psutil
    from django.conf import settings
    from django.contrib.auth.models import Group, User
    from django.core.management import call_command

    from accounts.models import ApiToken
    from gpus.services import register_host
    from llamacontroller_site.celery import app
    from llamacontroller_site.runner import web_command
    from models_app.launch import build_argv
    from models_app.models import GpuInstance, ModelConfig
    from models_app.registry import file_facts
    from models_app.services import request_load, request_unload

    call_command("migrate", verbosity=0)
    host = register_host(settings.HOST_NAME)
    if args.model == "gemma":
        path = gemma_file(settings.MODEL_DIRS[0])
    else:
        from models_app.testmodel import write_tiny_model

        path = write_tiny_model(settings.MODEL_DIRS[0] / "tiny.gguf")
    params = {"c": 4 * 1024, "np": 4} if args.rounds else {"c": 16 * 512, "np": 16}
    if args.no_repack:
        params["nr"] = None
    ModelConfig.objects.update_or_create(
        id="gemma3-270m",
        defaults={"name": "Gemma 3 270M", "path": str(path), "cli_params": params, **file_facts(path)},
    )
    operator = User.objects.create_user("bench-operator")
    operator.groups.add(Group.objects.get(name="operator"))
    token = ApiToken.issue(operator, "bench")[1]
    auth = {"Authorization": f"Bearer {token}"}

    logs = open(data / "processes.log", "ab")  # noqa: SIM115
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "llamacontroller_site", "worker", "-Q", f"default,{host.queue}",
         "-c", "2", "-l", "WARNING", "--without-gossip", "--without-mingle", "-n", "bench@%h"],
        cwd=REPO, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    port = (
        18099  # the instances take LLAMACONTROLLER_PORT_RANGE (18100-18199); the relay and LiteLLM below it
    )
    web = subprocess.Popen(
        web_command(Path(sys.executable).parent, bind=f"127.0.0.1:{port}", workers=2 if args.rounds else 1)
        + ["--access-logfile", "/dev/null"],
        cwd=REPO, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    gateway = f"http://127.0.0.1:{port}"
    others = {}  # another checkout's gateway: its name -> (its web command's process, its URL)
    for n, checkout in enumerate(args.checkout):
        bind = f"127.0.0.1:{port - 10 - n}"
        others[f"gateway /v1 @{checkout.resolve().name}"] = (
            subprocess.Popen(
                proxies.web_command(checkout, bind) + ["--access-logfile", "/dev/null"],
                cwd=checkout,
                stdout=logs,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            ),
            f"http://{bind}",
        )
    client = httpx.Client(trust_env=False, timeout=600)
    results = []
    relay = litellm = None
    try:
        deadline = time.monotonic() + 60
        while not app.control.ping(timeout=0.5):
            if time.monotonic() > deadline:
                raise RuntimeError("the worker did not start")
        while True:
            try:
                if client.get(gateway + "/api/version").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        web_worker = psutil.Process(web.pid).children()[0]

        if args.rounds:  # --- only the load case ------------------------------------------------------
            instance = request_load(model_id="gemma3-270m", gpu_spec="0", actor=None)
            wait_running(instance, poll=0.05)
            direct = f"http://127.0.0.1:{instance.port}/v1/chat/completions"
            direct_auth = {"Authorization": f"Bearer {instance.api_key}"}
            print(f"load: {args.streams} concurrent streams of {args.tokens} tokens, {args.rounds} rounds "
                  f"{args.pause:g} s apart, the model with -np 4, 2 web workers", flush=True)  # fmt: skip
            for name, url, headers in [("gateway /v1", gateway + "/v1/chat/completions", auth),
                                       ("direct /v1", direct, direct_auth)]:  # fmt: skip
                started = time.perf_counter()
                outcomes, errors = load_rounds(
                    url, headers, args.streams, args.rounds, args.tokens, args.pause
                )
                report_load(name, outcomes, errors, args.streams, args.rounds)
                print(f"    {time.perf_counter() - started:.1f} s", flush=True)
            results.append("ok")
            return

        # --- cold start -------------------------------------------------------------------------------
        if not args.no_cold:
            cold = []
            bare = []
            bare_port = settings.PORT_RANGE[1]
            argv = build_argv(settings.LLAMA_SERVER, str(path), params, bare_port, 1)
            for n in range(3):
                ttft, _, _, _ = stream(
                    client, gateway + "/v1/chat/completions", auth, openai_body(PROMPTS[n % 4], 4)
                )
                cold.append(ttft)
                instance = GpuInstance.objects.get(status="running")
                request_unload(instance=instance, actor=None)
                while (
                    GpuInstance.objects.filter(pk=instance.pk).values_list("status", flat=True).get()
                    != "stopped"
                ):
                    time.sleep(0.01)
                started = time.perf_counter()
                proc = subprocess.Popen(argv, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True)
                try:
                    while True:
                        try:
                            if client.get(f"http://127.0.0.1:{bare_port}/health").status_code == 200:
                                break
                        except httpx.HTTPError:
                            time.sleep(0.005)
                    healthy = time.perf_counter() - started
                    first, _, _, _ = stream(client, f"http://127.0.0.1:{bare_port}/v1/chat/completions", {},
                                         openai_body(PROMPTS[n % 4], 4))  # fmt: skip
                    bare.append(healthy + first)
                finally:
                    proc.terminate()
                    proc.wait(10)
            print(
                f"cold start: gateway {med(cold) * 1000:.0f} ms, bare {med(bare) * 1000:.0f} ms", flush=True
            )

        # --- the paths, one stream at a time, interleaved ------------------------------------------------
        instance = request_load(model_id="gemma3-270m", gpu_spec="0", actor=None)
        wait_running(instance, poll=0.05)
        direct = f"http://127.0.0.1:{instance.port}"
        direct_auth = {"Authorization": f"Bearer {instance.api_key}"}
        relay = proxies.start_relay(port - 1, instance.port, logs)
        paths = {  # name: (url, headers, Ollama?, the processes whose CPU is the path's)
            "direct /v1": (direct + "/v1/chat/completions", direct_auth, False, []),
            "gateway /v1": (gateway + "/v1/chat/completions", auth, False, [web_worker.pid]),
            "relay /v1": (
                f"http://127.0.0.1:{port - 1}/v1/chat/completions",
                direct_auth,
                False,
                [relay.pid],
            ),
            "gateway /api/generate": (gateway + "/api/generate", auth, True, [web_worker.pid]),
        }
        for name, (process, url) in others.items():
            proxies.wait_for(url + "/api/version")
            paths[name] = (
                url + "/v1/chat/completions",
                auth,
                False,
                [psutil.Process(process.pid).children()[0].pid],
            )
        if args.litellm:
            litellm = proxies.start_litellm(
                args.litellm, port - 2, instance.port, instance.api_key, data, logs
            )
            proxies.wait_for(f"http://127.0.0.1:{port - 2}/health/liveliness", 300)
            tree = [litellm.pid] + [c.pid for c in psutil.Process(litellm.pid).children(recursive=True)]
            paths["litellm /v1"] = (f"http://127.0.0.1:{port - 2}/v1/chat/completions",
                                    {"Authorization": "Bearer sk-bench"}, False, tree)  # fmt: skip
        proxies.wait_for(paths["relay /v1"][0].rsplit("/v1", 1)[0] + "/health")
        for url, headers, is_ollama, _ in paths.values():  # warm-up: connections, caches
            body = ollama_body(PROMPTS[0], 8) if is_ollama else openai_body(PROMPTS[0], 8)
            stream(client, url, headers, body, ollama=is_ollama)
        runs = {tokens: interleaved(client, paths, args.pairs, tokens) for tokens in (args.tokens, 1)}
        report_paths(runs, args.tokens)

        # --- concurrent streams -------------------------------------------------------------------------
        print(f"\n{args.streams} concurrent streams of {args.tokens} tokens (aggregate tokens/s over the wall "
              f"time; the paths in turn, {args.concurrent_runs} times; median)")  # fmt: skip
        rates = {name: [] for name in paths if not paths[name][2]}
        for _ in range(args.concurrent_runs):
            for name in rates:
                url, headers = paths[name][:2]
                rates[name].append(concurrent(url, headers, args.streams, args.tokens))
        for name, values in rates.items():
            print(
                f"{name:<30} {med(values):>9.1f} tokens/s ({med(values) / med(rates['direct /v1']):.3f}x direct)"
            )
        outcomes, errors = load_rounds(paths["gateway /v1"][0], auth, 64, 1, args.tokens, 0)
        report_load("gateway /v1", outcomes, errors, 64, 1)

        # --- memory with open requests -------------------------------------------------------------------
        if not args.no_memory:
            # More than the slots: the rest wait in the gateway's queue, as open requests do under load.
            idle_rss = web_worker.memory_info().rss
            sent = []

            def hold(n):
                try:
                    with httpx.Client(trust_env=False, timeout=600) as own:
                        body = openai_body(PROMPTS[n % 4], 100000)
                        sent.append(n)
                        with own.stream(
                            "POST", gateway + "/v1/chat/completions", json=body, headers=auth
                        ) as response:
                            for _ in response.iter_raw():
                                pass
                except httpx.HTTPError:
                    pass  # the instance is unloaded under it at the end

            holders = [threading.Thread(target=hold, args=(n,), daemon=True) for n in range(args.open)]
            for t in holders:
                t.start()
            time.sleep(5)
            open_rss = web_worker.memory_info().rss
            threads_open = web_worker.num_threads()
            connections = len([c for c in web_worker.net_connections() if c.laddr and c.laddr.port == port])
            print(f"\nweb worker RSS: idle {idle_rss / 2**20:.1f} MiB; with {args.open} open requests "
                  f"({connections} client connections, {min(args.streams, args.open)} streaming, the rest queued) "
                  f"{open_rss / 2**20:.1f} MiB (+{(open_rss - idle_rss) / 2**10 / args.open:.0f} KiB per request), "
                  f"{threads_open} threads", flush=True)  # fmt: skip
        results.append("ok")
    finally:
        for instance in GpuInstance.objects.filter(status__in=["running", "starting", "pending"]):
            request_unload(instance=instance, actor=None)
        time.sleep(2)
        for proxy in (relay, litellm):
            if proxy is not None:
                proxy.terminate()
        for process in [web] + [process for process, _ in others.values()]:
            process.terminate()
            process.wait(15)
        worker.terminate()
        worker.wait(30)
        if redis_server:
            redis_server.stop()


if __name__ == "__main__":
    main()
