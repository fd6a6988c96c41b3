"""The comparison paths of bench/gateway.py: the floor for a Python proxy, a raw asyncio TCP relay (no HTTP
parsing; one upstream connection per client connection, bytes passed on as they come), and, where it is
installed in a virtual environment of its own, LiteLLM's proxy (what a Python team would otherwise put in front
of llama-server). CPU is read from /proc for each proxy's processes.

    python bench/proxies.py LISTEN_PORT UPSTREAM_PORT     (the relay)
"""

import asyncio
import json
import os
import subprocess
import sys
import time
from pathlib import Path


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def relay(listen: int, upstream: int) -> None:
    async def serve(client_reader, client_writer):
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", upstream)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(_pipe(client_reader, server_writer), _pipe(server_reader, client_writer))

    server = await asyncio.start_server(serve, "127.0.0.1", listen)
    async with server:
        await server.serve_forever()


def start_relay(listen: int, upstream: int, log) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, __file__, str(listen), str(upstream)], stdout=log, stderr=log)


def start_litellm(
    binary: Path, listen: int, upstream: int, api_key: str, data: Path, log
) -> subprocess.Popen:
    """LiteLLM's proxy with a master key and no database, the model as an OpenAI-compatible upstream."""
    config = data / "litellm.yaml"
    config.write_text(
        "model_list:\n"
        "  - model_name: gemma3-270m\n"
        "    litellm_params:\n"
        "      model: openai/gemma3-270m\n"
        f"      api_base: http://127.0.0.1:{upstream}/v1\n"
        f"      api_key: {api_key}\n"
        "general_settings:\n"
        "  master_key: sk-bench\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env["LITELLM_LOG"] = "ERROR"
    return subprocess.Popen(
        [str(binary), "--config", str(config), "--port", str(listen), "--host", "127.0.0.1"],
        stdout=log, stderr=log, env=env, start_new_session=True,
    )  # fmt: skip


def cpu_seconds(pids) -> float:
    """User + system CPU of these processes and their threads so far, from /proc: the nanoseconds each thread
    ran (/proc/<pid>/task/<tid>/schedstat) where the kernel keeps them, else utime + stime in 10 ms ticks
    (which makes a figure per request from a batch of 40 a multiple of 0.25 ms). A thread that ended between
    two readings drops out of the first: the processes measured here keep theirs."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for pid in pids:
        try:
            total += sum(
                int((task / "schedstat").read_text().split()[0]) / 1e9
                for task in Path(f"/proc/{pid}/task").iterdir()
            )
            continue
        except (FileNotFoundError, ProcessLookupError, IndexError, ValueError, PermissionError):
            pass
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def web_command(checkout: Path, bind: str, workers: int = 1) -> list[str]:
    """The run command's web server as that checkout's own runner.web_command builds it (its worker class):
    a before/after comparison runs each checkout's web worker on the same database."""
    code = "import json, sys; from pathlib import Path; from llamacontroller_site.runner import web_command; "
    code += f"print(json.dumps(web_command(Path(sys.executable).parent, bind={bind!r}, workers={workers})))"
    return json.loads(subprocess.check_output([sys.executable, "-c", code], cwd=checkout))


def wait_for(url: str, seconds: float = 120) -> None:
    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            httpx.get(url, timeout=2, trust_env=False)
            return
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


if __name__ == "__main__":
    asyncio.run(relay(int(sys.argv[1]), int(sys.argv[2])))
