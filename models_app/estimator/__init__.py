"""Predict the memory a llama-server load needs, per GPU and on the host, from the GGUF header and the load's
flags. Plain Python (no Django, nothing else from models_app), like gpus/telemetry: the controller hands in
the file, the flags and the GPUs' free memory. Callers use this package's names (`estimator.estimate`, ...);
the modules import one way: gguf_header <- settings <- sizes, and llama_log beside them.

- gguf_header.py: the header, read without touching tensor data (a small parser seeks past arrays, so
  tokenizer vocabularies are counted, never turned into Python objects); the facts are cached by path, size
  and mtime. EstimateError lives here, at the bottom of the package. `summary` keeps what the estimate needs
  (tensor bytes per block) small enough to store: a host's worker reports it for each file it finds, and the
  web node estimates `from_summary` a file it cannot read itself.
- settings.py: the memory-relevant flags under canonical names, llama-server's defaults and its refusals.
- sizes.py: the formulas below and the result types (Estimate, DeviceEstimate).
- llama_log.py: llama.cpp's own accounting (the buffers llama-server logs, llama-fit-params) to check against.

The formulas follow llama.cpp (README "Memory prediction"):
- weights: the tensor table's bytes with ggml's block sizes; layers are offloaded from the last one, the
  output layer counting as one more (`-ngl 33` = 32 blocks + output for an 8B llama); `token_embd` stays on
  the host; several GPUs split the offloaded layers in proportion to `--tensor-split` (default: equal).
- KV cache: per layer `cells x (n_embd_k_gqa + n_embd_v_gqa) x bytes(type)`, f16 = 2 bytes, q8_0 = 34/32,
  q4_0 = 18/32; sliding-window layers hold `min(n_ctx, pad(n_swa x n_seq + n_ubatch, 256))` cells
  (a unified cache; `pad(n_swa + n_ubatch)` per slot otherwise).
- compute buffer: activations proportional to the micro-batch plus the attention's mask (and, without flash
  attention, the f32 score matrix): fitted to llama-server's logged buffers on this project's CPU build
  (docs/benchmarks.md has the error table).
- CUDA context: a per-device constant (DEFAULT_CUDA_OVERHEAD_MIB), refined by what loads measured.
"""

from .gguf_header import EstimateError, GgufFacts, from_summary, gguf_facts, read_header, summary
from .llama_log import fit_params, logged_buffers, parse_buffer_log
from .settings import (
    CACHE_TYPES,
    MEMORY_OPTIONS,
    SHORT_SPELLINGS,
    LoadSettings,
    memory_options,
    settings_for,
    switch,
    tensor_split,
    whole_number,
)
from .sizes import (
    DEFAULT_CUDA_OVERHEAD_MIB,
    MIB,
    DeviceEstimate,
    Estimate,
    compute_bytes,
    estimate,
    kv_layout,
)

__all__ = [
    "CACHE_TYPES",
    "DEFAULT_CUDA_OVERHEAD_MIB",
    "MEMORY_OPTIONS",
    "MIB",
    "SHORT_SPELLINGS",
    "DeviceEstimate",
    "Estimate",
    "EstimateError",
    "GgufFacts",
    "LoadSettings",
    "compute_bytes",
    "estimate",
    "fit_params",
    "from_summary",
    "gguf_facts",
    "kv_layout",
    "logged_buffers",
    "memory_options",
    "parse_buffer_log",
    "read_header",
    "settings_for",
    "summary",
    "switch",
    "tensor_split",
    "whole_number",
]
