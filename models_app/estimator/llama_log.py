"""llama.cpp's own accounting, for checking the estimator: the buffers llama-server logs while loading, and
`llama-fit-params` (where the build has it) as a second opinion. Plain Python; these run processes, so they
are for the worker, the checks and bench/estimate.py, never for a request."""

import os
import re
from pathlib import Path

from .gguf_header import EstimateError


def parse_buffer_log(text: str) -> dict:
    """The buffers llama-server logs while loading (MiB, summed over devices): model, KV, compute, output.
    llama-server prints them at verbosity 4 (`-lv 4`)."""

    def total(pattern):
        found = re.findall(pattern + r"\s*=\s*([\d.]+) MiB", text)
        return round(sum(float(x) for x in found), 2) if found else None

    return {
        "model_mib": total(r"model buffer size"),
        "kv_mib": total(r"KV buffer size"),
        "compute_mib": total(r"compute buffer size"),
        "output_mib": total(r"output buffer size"),
    }


def logged_buffers(binary: str, model: str, args: list[str], *, timeout: float = 30.0) -> dict:
    """Start llama-server on `model` with `args` (an argument list, no shell; a free port among them or
    `--port 0` is the caller's business), read the buffer sizes it logs while loading (`-lv 4`), stop it.
    Used by the checks and bench/estimate.py, never by a request."""
    import subprocess
    import tempfile
    import time

    with tempfile.TemporaryFile("w+b") as log:
        process = subprocess.Popen(
            [binary, "-m", model, "-lv", "4", "--no-warmup", *args],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        text = ""
        try:
            while time.monotonic() < deadline:
                time.sleep(0.1)
                log.seek(0)
                text = log.read().decode("utf-8", "replace")
                if "listening on" in text or "model loaded" in text or process.poll() is not None:
                    break
        finally:
            process.terminate()
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        log.seek(0)
        text = log.read().decode("utf-8", "replace")
    buffers = parse_buffer_log(text)
    if buffers["model_mib"] is None:
        tail = "\n".join(text.strip().splitlines()[-5:])
        raise EstimateError(f"llama-server logged no buffer sizes (exit {process.returncode}): {tail}")
    return buffers


def fit_params(
    binary_dir: str, model: str, args: list[str], *, timeout: float = 60.0, env: dict | None = None
) -> list[dict] | None:
    """llama.cpp's own estimate, where the build has `llama-fit-params` with `--fit-print`: one line per
    device, `<device> <model> <context> <compute>` in MiB. None when the tool is missing or fails."""
    import subprocess

    tool = Path(binary_dir) / "llama-fit-params"
    if not tool.is_file() or not os.access(tool, os.X_OK):
        return None
    try:
        done = subprocess.run(
            [str(tool), "-m", model, "--fit-print", "on", *args],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
            env=env,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    devices = []
    for line in done.stdout.decode("utf-8", "replace").splitlines():
        parts = line.split()
        if len(parts) == 4 and all(p.replace(".", "", 1).isdigit() for p in parts[1:]):
            model_mib, context_mib, compute_mib = (float(p) for p in parts[1:])
            devices.append(
                {
                    "device": parts[0],
                    "model_mib": model_mib,
                    "context_mib": context_mib,
                    "compute_mib": compute_mib,
                }
            )
    return devices or None
