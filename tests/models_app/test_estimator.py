"""The memory estimator against the formulas by hand, on synthetic GGUF headers written with the `gguf` package
as sparse files (a real 8B-class tensor table, no weights): weights per layer and their offload order,
KV with per-layer heads, sliding windows and quantized caches, the split across GPUs, flags resolved through
llama-server's own catalogue, and a header read that never walks the vocabulary in Python."""

import time
from pathlib import Path

import gguf
import pytest

from models_app import estimator
from models_app.flags import Catalogue, parse_help
from tests.gguf_helpers import Q6_K, layer_bytes, qbytes, write_llama8b, write_small_gemma3

MIB = 1024 * 1024
FIXTURES = Path(__file__).parent.parent / "fixtures" / "llama-server"


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory) -> Path:
    return write_llama8b(tmp_path_factory.mktemp("gguf") / "llama8b.gguf")


def test_the_file_is_sparse_and_the_header_is_read_without_walking_the_vocabulary(llama8b):
    assert llama8b.stat().st_size > 4_500_000_000 and llama8b.stat().st_blocks * 512 < 50 * MIB
    started = time.perf_counter()
    facts = estimator.read_header(llama8b)
    assert time.perf_counter() - started < 1.0  # GGUFReader takes seconds on a 128k vocabulary
    assert facts.metadata["tokenizer.ggml.tokens"] == {"array_len": 128256}
    assert len(facts.tensors) == 3 + 9 * 32
    assert estimator.gguf_facts(llama8b) is estimator.gguf_facts(llama8b)  # cached by path, size, mtime


def test_8b_weights_and_kv_by_hand_and_against_the_published_figures(llama8b):
    facts = estimator.gguf_facts(llama8b)
    result = estimator.estimate(facts, {"ctx-size": 512, "gpu-layers": 33, "flash-attn": "off"}, gpus=1)
    gpu, host = result.devices[0], result.host
    by_hand = sum(layer_bytes(i) for i in range(32)) + qbytes(Q6_K, 128256, 4096) + 4096 * 4
    assert gpu.weights == by_hand
    assert gpu.layers == list(range(33)) and gpu.output
    # Published llama.cpp log for Llama-3-8B Q4_K_M: 4403.49 MiB on the GPU, token_embd 281.81 MiB on the host.
    assert gpu.weights / MIB == pytest.approx(4403.49, rel=0.001)
    assert host.weights / MIB == pytest.approx(281.81, abs=0.01)
    # KV: n_ctx x 32 layers x (1024 + 1024) x 2 bytes = 64 MiB at 512 and 1024 MiB at 8192 (published).
    assert gpu.kv == 512 * 32 * 2048 * 2 == 64 * MIB
    at_8k = estimator.estimate(facts, {"ctx-size": 8192, "flash-attn": "off"}, gpus=1)
    assert at_8k.devices[0].kv == 1024 * MIB
    # Compute without flash attention: the f32 mask over the KV cells, plus the busiest phase: at 512 cells the
    # gated FFN (4 n_ff + 1.5 n_embd floats per micro-batch token), at 8192 the f32 scores of all heads
    # (plus 5.5 q_dim + n_embd per token).
    ffn = 512 * 4 * (4 * 14336 + 6144)
    assert gpu.compute == 512 * 512 * 4 + ffn
    assert at_8k.devices[0].compute == 8192 * 512 * 4 + 8192 * 512 * 32 * 4 + 512 * 4 * (22528 + 4096)
    assert gpu.overhead == estimator.DEFAULT_CUDA_OVERHEAD_MIB * MIB
    assert gpu.total == gpu.weights + gpu.kv + gpu.compute + gpu.overhead
    # Default context: the model's trained context (8192 here), as llama-server does.
    assert estimator.estimate(facts, {}, gpus=1).settings.n_ctx == 8192


# llama-server's own compute buffer (MiB, `-lv 4`, CPU build, `-nr -t 2`) for this 8B header loaded as a file
# of zeros (tests/gguf_helpers.py's tensor table with an SPM vocabulary of 128256 tokens), ubatch 512 unless
# given; issue 17 saw 132 MiB at 8192 with flash attention (llama.cpp's default `auto`) estimated as 112.
LOGGED_8B_COMPUTE = [
    ({"ctx-size": 8192}, 132.02),
    ({"ctx-size": 512}, 124.52),
    ({"ctx-size": 16384}, 140.02),
    ({"ctx-size": 2048, "ubatch-size": 128}, 31.50),
    ({"ctx-size": 4096, "ubatch-size": 1024, "batch-size": 1024}, 256.04),
    ({"ctx-size": 8192, "parallel": 8}, 125.02),
    ({"ctx-size": 512, "flash-attn": "off"}, 129.01),
    ({"ctx-size": 2048, "flash-attn": "off"}, 184.01),
    ({"ctx-size": 8192, "flash-attn": "off"}, 580.01),
]


@pytest.mark.parametrize(
    ("options", "logged_mib"), LOGGED_8B_COMPUTE, ids=[str(o) for o, _ in LOGGED_8B_COMPUTE]
)
def test_8b_compute_buffer_against_llama_servers_log(llama8b, options, logged_mib):
    facts = estimator.gguf_facts(llama8b)
    compute = estimator.compute_bytes(facts, estimator.settings_for(facts, options)) / MIB
    assert compute == pytest.approx(logged_mib, rel=0.05)


def test_8b_compute_with_flash_attention_is_the_ffn_phase(llama8b):
    facts = estimator.gguf_facts(llama8b)
    result = estimator.estimate(facts, {"ctx-size": 8192}, gpus=1)  # flash attention: auto
    assert result.settings.flash_attn
    # f16 mask 8192 x 512 x 2 bytes, plus gate, up, their product and one more n_ff-wide tensor, and 1.5 rows
    # of the residual stream, per micro-batch token in f32: 8 + 124 = 132 MiB (llama-server: 132.02).
    assert result.devices[0].compute == 8192 * 512 * 2 + 512 * 4 * (4 * 14336 + 6144) == 132 * MIB


def test_partial_offload_goes_from_the_last_layer_and_counts_the_output_layer(llama8b):
    facts = estimator.gguf_facts(llama8b)
    result = estimator.estimate(facts, {"ctx-size": 1024, "gpu-layers": 10}, gpus=1)
    gpu, host = result.devices[0], result.host
    assert gpu.layers == list(range(23, 33))  # 9 blocks + output
    assert gpu.weights == sum(layer_bytes(i) for i in range(23, 32)) + qbytes(Q6_K, 128256, 4096) + 4096 * 4
    assert host.layers == list(range(23))
    assert gpu.kv == 9 * 1024 * 2048 * 2 and host.kv == 23 * 1024 * 2048 * 2
    assert host.compute > 0  # the CPU runs its layers
    none = estimator.estimate(facts, {"ctx-size": 1024, "gpu-layers": 0}, gpus=1)
    assert none.devices[0].weights == 0 and none.devices[0].kv == 0


def test_split_across_gpus_by_layer_with_tensor_split(llama8b):
    facts = estimator.gguf_facts(llama8b)
    equal = estimator.estimate(facts, {"ctx-size": 2048}, gpus=2)
    first, second = equal.devices
    # 33 offloaded layers, split at the middle: layer il goes to the device whose share holds il / 33.
    assert first.layers == list(range(17)) and second.layers == list(range(17, 33)) and second.output
    assert first.kv == 17 * 2048 * 2048 * 2 and second.kv == 15 * 2048 * 2048 * 2
    assert first.compute == second.compute > 0 and first.overhead == second.overhead
    skewed = estimator.estimate(facts, {"ctx-size": 2048, "tensor-split": "3,1"}, gpus=2)
    assert len(skewed.devices[0].layers) == 25 and len(skewed.devices[1].layers) == 8
    single = estimator.estimate(facts, {"ctx-size": 2048}, gpus=1)
    assert sum(d.weights for d in equal.devices) == single.devices[0].weights
    assert sum(d.kv for d in equal.devices) == single.devices[0].kv


def test_quantized_kv_uses_ggml_block_sizes(llama8b):
    facts = estimator.gguf_facts(llama8b)
    f16 = estimator.estimate(facts, {"ctx-size": 4096}, gpus=1).devices[0].kv
    q8 = estimator.estimate(facts, {"ctx-size": 4096, "cache-type-k": "q8_0", "cache-type-v": "q8_0"}, gpus=1)
    q4 = estimator.estimate(facts, {"ctx-size": 4096, "cache-type-k": "q4_0", "cache-type-v": "q4_0"}, gpus=1)
    mixed = estimator.estimate(facts, {"ctx-size": 4096, "cache-type-k": "q8_0"}, gpus=1)
    assert f16 == 4096 * 32 * 2048 * 2
    assert q8.devices[0].kv == 4096 * 32 * 2048 * 34 // 32
    assert q4.devices[0].kv == 4096 * 32 * 2048 * 18 // 32
    assert mixed.devices[0].kv == 4096 * 32 * (1024 * 34 // 32 + 1024 * 2)
    with pytest.raises(estimator.EstimateError, match="cache-type-k: unknown cache type 'q3'"):
        estimator.estimate(facts, {"cache-type-k": "q3"}, gpus=1)


@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> Path:
    """A small gemma3: 12 layers, 1 KV head of 256, a 512-token window, per-layer head counts."""
    return write_small_gemma3(tmp_path_factory.mktemp("gguf") / "gemma3.gguf")


def test_sliding_window_layers_hold_only_the_window(gemma3):
    facts = estimator.gguf_facts(gemma3)
    s = estimator.settings_for(facts, {"ctx-size": 8192})
    sizes, sliding = estimator.kv_layout(facts, s)
    assert sliding == [True] * 5 + [False] + [True] * 5 + [False]  # 5 of every 6
    row = 2 * 256 * 2  # K and V, one head of 256, f16
    # Four slots share one cache: the window layers hold pad(512 x 4 + 512, 256) = 2560 cells.
    assert sizes[0] == 2560 * row and sizes[5] == 8192 * row
    small = estimator.kv_layout(facts, estimator.settings_for(facts, {"ctx-size": 1024}))[0]
    assert small[0] == small[5] == 1024 * row  # the window is larger than the context
    one_slot = estimator.kv_layout(facts, estimator.settings_for(facts, {"ctx-size": 8192, "parallel": 1}))[0]
    assert one_slot[0] == 1024 * row
    full = estimator.kv_layout(facts, estimator.settings_for(facts, {"ctx-size": 8192, "swa-full": None}))[0]
    assert full[0] == 8192 * row
    # Tied embeddings: the output layer on a GPU is a copy of token_embd.
    result = estimator.estimate(facts, {"ctx-size": 1024}, gpus=1)
    assert result.devices[0].weights >= 1000 * 640 * 4 and result.host.weights == 1000 * 640 * 4


def test_flags_resolve_through_the_binarys_catalogue():
    catalogue = Catalogue({"version": "b1", "options": parse_help((FIXTURES / "help.txt").read_text())})
    params = {"c": 4096, "ngl": 99, "ctk": "q8_0", "n-gpu-layers": 20, "t": 4, "no-mmap": None, "fa": False}
    options = estimator.memory_options(params, catalogue)
    assert options == {"ctx-size": 4096, "gpu-layers": 20, "cache-type-k": "q8_0"}
    assert estimator.memory_options({"c": 512, "ub": 128}) == {"ctx-size": 512, "ubatch-size": 128}


def test_parse_buffer_log():
    text = (
        "load_tensors:   CPU_Mapped model buffer size =   235.16 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =     6.00 MiB\n"
        "llama_kv_cache:        CPU KV buffer size =    30.00 MiB\n"
        "sched_reserve:        CPU compute buffer size =    22.28 MiB\n"
    )
    assert estimator.parse_buffer_log(text) == {
        "model_mib": 235.16, "kv_mib": 36.0, "compute_mib": 22.28, "output_mib": None,
    }  # fmt: skip


def test_a_file_that_is_not_gguf_is_an_estimate_error(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(estimator.EstimateError, match="not a GGUF file"):
        estimator.read_header(bad)


def test_tensor_bytes_agree_with_the_gguf_packages_reader(gemma3):
    reader = gguf.GGUFReader(str(gemma3))
    facts = estimator.read_header(gemma3)
    assert facts.tensors == {t.name: int(t.n_bytes) for t in reader.tensors}
    assert facts.parameter_count == sum(int(t.n_elements) for t in reader.tensors)
