"""Issue 17 (item 7): the compute buffer of an 8B llama against llama-server's own log. The real binary loads
a Llama-3-8B-shaped Q4_K_M file whose tensor data is a hole (tests/gguf_helpers.py's tensor table, with an
SPM vocabulary llama.cpp can load: 4.9 GB on paper, a few MB on disk; `-nr` maps it without reading it) and
logs its buffers; the estimate of the same load must be within 10 % (flash attention on, llama.cpp's default
`auto`, was 15-16 % low: 112 against 132 MiB at 8192)."""

import socket
from pathlib import Path

import gguf
import pytest

from models_app import estimator
from tests.gguf_helpers import F32, Q4_K, Q6_K, use_more_bits, write_tensor_table

pytestmark = pytest.mark.e2e
MIB = estimator.MIB


def write_loadable_8b(path: Path) -> Path:
    n, embd, ff, vocab, heads, kv_heads = 32, 4096, 14336, 128256, 32, 8
    kv = embd // heads * kv_heads
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(8192)
    writer.add_embedding_length(embd)
    writer.add_block_count(n)
    writer.add_feed_forward_length(ff)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(embd // heads)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [gguf.TokenType.UNKNOWN] + [gguf.TokenType.CONTROL] * 2 + [gguf.TokenType.BYTE] * 256
    tokens += [f"t{i}" for i in range(vocab - len(tokens))]
    types += [gguf.TokenType.NORMAL] * (vocab - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores([0.0] * vocab)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    tensors = [("token_embd.weight", (vocab, embd), Q4_K), ("output.weight", (vocab, embd), Q6_K)]
    tensors.append(("output_norm.weight", (embd,), F32))
    for i in range(n):
        more = Q6_K if use_more_bits(i, n) else Q4_K
        for name, shape, kind in [
            ("attn_norm", (embd,), F32), ("attn_q", (embd, embd), Q4_K), ("attn_k", (kv, embd), Q4_K),
            ("attn_v", (kv, embd), more), ("attn_output", (embd, embd), Q4_K), ("ffn_norm", (embd,), F32),
            ("ffn_gate", (ff, embd), Q4_K), ("ffn_up", (ff, embd), Q4_K), ("ffn_down", (embd, ff), more),
        ]:  # fmt: skip
            tensors.append((f"blk.{i}.{name}.weight", shape, kind))
    return write_tensor_table(writer, path, tensors)


@pytest.fixture(scope="module")
def llama8b(tmp_path_factory) -> Path:
    return write_loadable_8b(tmp_path_factory.mktemp("gguf") / "llama8b-zeros.gguf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


CASES = [["-c", "8192"], ["-c", "2048", "-ub", "256"], ["-c", "2048", "-fa", "off"]]


@pytest.mark.parametrize("args", CASES, ids=[" ".join(a) for a in CASES])
def test_8b_compute_buffer_within_10_percent(args, llama_server_path, llama8b):
    logged = estimator.logged_buffers(
        str(llama_server_path),
        str(llama8b),
        [*args, "-nr", "-t", "2", "--port", str(free_port())],
        timeout=120,
    )
    options = {estimator.SHORT_SPELLINGS[args[i].lstrip("-")]: args[i + 1] for i in range(0, len(args), 2)}
    facts = estimator.gguf_facts(llama8b)
    result = estimator.estimate(facts, options, gpus=0)
    assert result.host.kv / MIB == pytest.approx(logged["kv_mib"], rel=0.02)
    compute = estimator.compute_bytes(facts, result.settings) / MIB
    print(f"8B {' '.join(args)}: compute {compute:.2f} MiB estimated, {logged['compute_mib']:.2f} MiB logged")
    assert compute == pytest.approx(logged["compute_mib"], rel=0.10)
