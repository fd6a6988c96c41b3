"""Synthetic GGUF files for the memory estimator's tests: real headers and tensor tables, sparse data."""

from pathlib import Path

import gguf
import numpy as np

Q4_K, Q6_K, F32 = (
    gguf.GGMLQuantizationType.Q4_K,
    gguf.GGMLQuantizationType.Q6_K,
    gguf.GGMLQuantizationType.F32,
)


def qbytes(kind, *shape):
    block, size = gguf.GGML_QUANT_SIZES[kind]
    return int(np.prod(shape)) // block * size


def write_sparse(
    path: Path, arch: str, keys: dict, tensors: list[tuple[str, tuple, object]], vocab=0
) -> Path:
    """A GGUF whose header is real and whose tensor data is a hole: the file has its full size on disk."""
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in keys.items():
        if isinstance(value, list):
            writer.add_array(f"{arch}.{key}", value)
        elif isinstance(value, int):
            writer.add_uint32(f"{arch}.{key}", value)
        else:
            writer.add_float32(f"{arch}.{key}", value)
    if vocab:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"t{i}" for i in range(vocab)])
    return write_tensor_table(writer, path, tensors)


def write_tensor_table(writer: gguf.GGUFWriter, path: Path, tensors: list[tuple[str, tuple, object]]) -> Path:
    """Finish `writer`'s file: the tensor table, and the data as a hole of its full size (sparse on disk)."""
    total = 0
    for name, shape, kind in tensors:
        nbytes = qbytes(kind, *shape)
        total += nbytes + (-nbytes % 32)
        # numpy order (rows, cols) in bytes per row; GGUF stores the element shape reversed
        block, size = gguf.GGML_QUANT_SIZES[kind]
        byte_shape = (*shape[:-1], shape[-1] // block * size)
        writer.add_tensor_info(name, byte_shape, np.dtype(np.uint8), nbytes, raw_dtype=kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    with open(path, "r+b") as handle:
        header_end = handle.seek(0, 2)
        handle.truncate(header_end + (-header_end % 32) + total)  # tensor data starts 32-byte aligned
    return path


def use_more_bits(i: int, n: int) -> bool:
    """llama.cpp's Q4_K_M rule: attn_v and ffn_down get Q6_K in these layers."""
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def write_llama8b(path: Path) -> Path:
    """Llama-3-8B Q4_K_M's tensor table: 32 layers, 4096 wide, 32 heads, 8 KV heads, 14336 FFN, 128256 tokens."""
    n, embd, ff, vocab, kv = 32, 4096, 14336, 128256, 1024
    tensors = [("token_embd.weight", (vocab, embd), Q4_K), ("output.weight", (vocab, embd), Q6_K)]
    tensors.append(("output_norm.weight", (embd,), F32))
    for i in range(n):
        more = Q6_K if use_more_bits(i, n) else Q4_K
        tensors += [
            (f"blk.{i}.attn_norm.weight", (embd,), F32),
            (f"blk.{i}.attn_q.weight", (embd, embd), Q4_K),
            (f"blk.{i}.attn_k.weight", (kv, embd), Q4_K),
            (f"blk.{i}.attn_v.weight", (kv, embd), more),
            (f"blk.{i}.attn_output.weight", (embd, embd), Q4_K),
            (f"blk.{i}.ffn_norm.weight", (embd,), F32),
            (f"blk.{i}.ffn_gate.weight", (ff, embd), Q4_K),
            (f"blk.{i}.ffn_up.weight", (ff, embd), Q4_K),
            (f"blk.{i}.ffn_down.weight", (embd, ff), more),
        ]
    keys = {
        "block_count": n, "context_length": 8192, "embedding_length": embd, "feed_forward_length": ff,
        "attention.head_count": 32, "attention.head_count_kv": 8,
    }  # fmt: skip
    return write_sparse(path, "llama", keys, tensors, vocab=vocab)


def layer_bytes(i: int) -> int:
    more = Q6_K if use_more_bits(i, 32) else Q4_K
    return (
        2 * 4096 * 4
        + 2 * qbytes(Q4_K, 4096, 4096)
        + qbytes(Q4_K, 1024, 4096)
        + qbytes(more, 1024, 4096)
        + 2 * qbytes(Q4_K, 14336, 4096)
        + qbytes(more, 4096, 14336)
    )


def write_small_gemma3(path: Path) -> Path:
    """A small gemma3 header: 12 layers, 1 KV head of 256, a 512-token window, per-layer head counts; its data
    a sparse hole."""
    tensors = [("token_embd.weight", (1000, 640), F32), ("output_norm.weight", (640,), F32)]
    for i in range(12):
        tensors += [(f"blk.{i}.attn_q.weight", (1024, 640), F32), (f"blk.{i}.attn_k.weight", (256, 640), F32)]
    keys = {
        "block_count": 12, "context_length": 32768, "embedding_length": 640, "feed_forward_length": 2048,
        "attention.head_count": 4, "attention.head_count_kv": [1] * 12, "attention.key_length": 256,
        "attention.value_length": 256, "attention.sliding_window": 512,
    }  # fmt: skip
    return write_sparse(path, "gemma3", keys, tensors, vocab=1000)
