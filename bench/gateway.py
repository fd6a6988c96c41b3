"""The gateway's cost: Gemma 3 270M (Q4_K_M) through the gateway against straight to its llama-server.

    .venv/bin/python bench/gateway.py [--pairs 30] [--tokens 64] [--model gemma|tiny] [--no-repack]

(The registry id is `gemma3-270m` whichever file serves it.)

- generation tokens/s and time to first token, one stream at a time, gateway and direct interleaved with
  the same prompts (OpenAI route passed through; Ollama /api/generate translated); the first-token overhead
  is the median of the pairs' differences, and also that median taken per order (gateway or direct first)
  and averaged: the second request of a pair may find its prompt in llama-server's cache, which makes the
  differences two-humped on a CPU;
- 16 concurrent streams (aggregate tokens/s), both ways;
- the web worker's memory (RSS of the gunicorn/uvicorn worker process) idle and with 100 open streams;
- cold start: a request for an unloaded model -> first token (load on demand through the real worker),
  against a bare llama-server start + first token.

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

from load import gemma_file, prepare_environment, start_broker  # noqa: E402  (bench/load.py: the same set-up)

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
    return ttft, rate, tokens


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
    from models_app.lifecycle import build_argv
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
    port = 18099
    web = subprocess.Popen(
        web_command(Path(sys.executable).parent, bind=f"127.0.0.1:{port}", workers=2 if args.rounds else 1)
        + ["--access-logfile", "/dev/null"],
        cwd=REPO, stdout=logs, stderr=subprocess.STDOUT, start_new_session=True,
    )  # fmt: skip
    gateway = f"http://127.0.0.1:{port}"
    client = httpx.Client(trust_env=False, timeout=600)
    results = []
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
            while (
                GpuInstance.objects.filter(pk=instance.pk).values_list("status", flat=True).get() != "running"
            ):
                time.sleep(0.05)
            instance.refresh_from_db()
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
        cold = []
        bare = []
        bare_port = settings.PORT_RANGE[1]
        argv = build_argv(settings.LLAMA_SERVER, str(path), params, bare_port, 1)
        for n in range(3):
            ttft, _, _ = stream(
                client, gateway + "/v1/chat/completions", auth, openai_body(PROMPTS[n % 4], 4)
            )
            cold.append(ttft)
            instance = GpuInstance.objects.get(status="running")
            request_unload(instance=instance, actor=None)
            while (
                GpuInstance.objects.filter(pk=instance.pk).values_list("status", flat=True).get() != "stopped"
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
                first, _, _ = stream(client, f"http://127.0.0.1:{bare_port}/v1/chat/completions", {},
                                     openai_body(PROMPTS[n % 4], 4))  # fmt: skip
                bare.append(healthy + first)
            finally:
                proc.terminate()
                proc.wait(10)
        print(f"cold start: gateway {med(cold) * 1000:.0f} ms, bare {med(bare) * 1000:.0f} ms", flush=True)

        # --- one stream at a time, interleaved ----------------------------------------------------------
        instance = request_load(model_id="gemma3-270m", gpu_spec="0", actor=None)
        while GpuInstance.objects.filter(pk=instance.pk).values_list("status", flat=True).get() != "running":
            time.sleep(0.05)
        instance.refresh_from_db()
        direct = f"http://127.0.0.1:{instance.port}"
        direct_auth = {"Authorization": f"Bearer {instance.api_key}"}
        stream(client, gateway + "/v1/chat/completions", auth, openai_body(PROMPTS[0], 8))  # warm-up
        rows = {"gateway /v1": [], "direct /v1": [], "gateway /api/generate": []}
        for n in range(args.pairs):
            prompt = PROMPTS[n % len(PROMPTS)]
            order = [("gateway /v1", gateway + "/v1/chat/completions", auth, False),
                     ("direct /v1", direct + "/v1/chat/completions", direct_auth, False),
                     ("gateway /api/generate", gateway + "/api/generate", auth, True)]  # fmt: skip
            if n % 2:
                order = order[1:2] + order[0:1] + order[2:]
            for name, url, headers, is_ollama in order:
                body = ollama_body(prompt, args.tokens) if is_ollama else openai_body(prompt, args.tokens)
                rows[name].append(stream(client, url, headers, body, ollama=is_ollama))
        print(f"\none stream at a time: {args.pairs} interleaved runs of {args.tokens} tokens, medians")
        print(f"{'path':<24} {'tokens/s':>9} {'first token ms':>15}")
        for name, runs in rows.items():
            print(f"{name:<24} {med(r[1] for r in runs):>9.1f} {med(r[0] for r in runs) * 1000:>15.1f}")
        ratio = med(r[1] for r in rows["gateway /v1"]) / med(r[1] for r in rows["direct /v1"])
        differences = [g[0] - d[0] for g, d in zip(rows["gateway /v1"], rows["direct /v1"], strict=True)]
        pairs = sorted(differences)
        overhead = med(pairs) * 1000
        quartiles = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
        print(
            f"gateway/direct tokens/s: {ratio:.3f}x; first-token overhead (median of pairs): {overhead:.2f} ms"
            f" (quartiles {quartiles[0] * 1000:.1f} / {quartiles[2] * 1000:.1f} ms)"
        )
        # Whichever of a pair goes second may find its prompt in llama-server's cache: the order alternates,
        # and the median of each order, averaged, cancels that out.
        first = [x for n, x in enumerate(differences) if n % 2 == 0]  # the gateway went first
        second = [x for n, x in enumerate(differences) if n % 2 == 1]
        if first and second:
            balanced = (med(first) + med(second)) / 2 * 1000
            print(
                f"  by order: gateway first {med(first) * 1000:.2f} ms, direct first {med(second) * 1000:.2f} ms;"
                f" balanced {balanced:.2f} ms; each pair (ms): "
                + " ".join(f"{x * 1000:.1f}" for x in differences)
            )

        # --- concurrent streams -------------------------------------------------------------------------
        def concurrent(url, headers) -> tuple[float, int]:
            out = []

            def one(n):
                with httpx.Client(trust_env=False, timeout=600) as own:
                    out.append(stream(own, url, headers, openai_body(PROMPTS[n % 4], args.tokens)))

            threads = [threading.Thread(target=one, args=(n,)) for n in range(args.streams)]
            started = time.perf_counter()
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - started
            return sum(r[2] for r in out) / elapsed, sum(r[2] for r in out)

        print(
            f"\n{args.streams} concurrent streams of {args.tokens} tokens (aggregate tokens/s over the wall time)"
        )
        for name, url, headers in [("direct /v1", direct + "/v1/chat/completions", direct_auth),
                                   ("gateway /v1", gateway + "/v1/chat/completions", auth)]:  # fmt: skip
            rate, total = concurrent(url, headers)
            print(f"{name:<24} {rate:>9.1f} tokens/s ({total} tokens)", flush=True)

        # --- memory with open requests -------------------------------------------------------------------
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
        web.terminate()
        web.wait(15)
        worker.terminate()
        worker.wait(30)
        if redis_server:
            redis_server.stop()


if __name__ == "__main__":
    main()
