"""A load's settings as llama-server would take them: the memory-relevant flags under one canonical name each
(memory_options), checked and refused the way llama-server refuses them, with its defaults where a flag is
missing (settings_for). Plain Python (no Django); sizes.py turns these settings into bytes."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .gguf_header import EstimateError, GgufFacts

# ggml's KV cache types, the values -ctk/-ctv take: (elements per block, bytes per block); sizes.py sizes rows
# with them.
CACHE_TYPES = {
    "f32": (1, 4), "f16": (1, 2), "bf16": (1, 2), "q8_0": (32, 34), "q4_0": (32, 18), "q4_1": (32, 20),
    "q5_0": (32, 22), "q5_1": (32, 24), "iq4_nl": (32, 18),
}  # fmt: skip

# The options that change memory, by one long spelling llama-server has for each. cli_params are resolved
# through the binary's catalogue (models_app/flags.py) to the option, and the option is matched on any of
# these spellings, so `c`, `ctx-size` and `-c` all arrive here as "ctx-size".
MEMORY_OPTIONS = {
    "--ctx-size": "ctx-size", "--gpu-layers": "gpu-layers", "--n-gpu-layers": "gpu-layers",
    "--cache-type-k": "cache-type-k", "--cache-type-v": "cache-type-v", "--flash-attn": "flash-attn",
    "--parallel": "parallel", "--batch-size": "batch-size", "--ubatch-size": "ubatch-size",
    "--split-mode": "split-mode", "--tensor-split": "tensor-split", "--no-kv-offload": "no-kv-offload",
    "--kv-unified": "kv-unified", "--no-kv-unified": "no-kv-unified", "--swa-full": "swa-full",
    "--main-gpu": "main-gpu", "--fit": "fit", "--fit-ctx": "fit-ctx",
}  # fmt: skip
# Without a catalogue (a unit test, a host without a binary): llama-server's usual short spellings.
SHORT_SPELLINGS = {
    "c": "ctx-size", "ngl": "gpu-layers", "ctk": "cache-type-k", "ctv": "cache-type-v", "fa": "flash-attn",
    "np": "parallel", "b": "batch-size", "ub": "ubatch-size", "sm": "split-mode", "ts": "tensor-split",
    "nkvo": "no-kv-offload", "kvu": "kv-unified", "no-kvu": "no-kv-unified", "mg": "main-gpu", "fitc": "fit-ctx",
}  # fmt: skip
# V cache types that need flash attention: llama-server refuses a quantized V cache with `-fa off`.
UNQUANTIZED = {"f32", "f16", "bf16"}
SPLIT_MODES = ("none", "layer", "row", "tensor")
# Numbers as llama-server reads them: ASCII digits only (Python's int() and float() also take "１００").
WHOLE = re.compile(r"[+-]?[0-9]+", re.ASCII)
DECIMAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?", re.ASCII)


def memory_options(cli_params: dict | None, catalogue=None) -> dict:
    """The memory-relevant cli_params under canonical names: {"ctx-size": 8192, "gpu-layers": 99, ...}.
    `catalogue` (a flags.Catalogue) resolves the names the way the binary does; unknown flags are skipped
    here (the registry refuses them before a load)."""
    options = {}
    for name, value in (cli_params or {}).items():
        canonical = None
        if catalogue is not None:
            try:
                names = catalogue.resolve(name).option["names"]
            except ValueError:
                continue
            canonical = next((MEMORY_OPTIONS[n] for n in names if n in MEMORY_OPTIONS), None)
        else:
            canonical = SHORT_SPELLINGS.get(name) or MEMORY_OPTIONS.get(f"--{name}")
        if canonical is not None and value is not False:
            options[canonical] = value
    return options


@dataclass
class LoadSettings:
    n_ctx: int
    n_gpu_layers: int
    cache_k: str
    cache_v: str
    flash_attn: bool
    n_seq: int
    kv_unified: bool
    n_batch: int
    n_ubatch: int
    split_mode: str
    tensor_split: list[float] | None
    kv_offload: bool
    swa_full: bool


def whole_number(name: str, raw) -> int:
    """`raw` as an int: an int, or ASCII digits with an optional sign; EstimateError naming `name`."""
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    text = str(raw).strip()
    if not WHOLE.fullmatch(text):
        raise EstimateError(f"{name}: {raw!r} is not a whole number")
    return int(text)


def tensor_split(raw) -> list[float]:
    """`-ts 3,1` (or 3/1) as proportions: finite, not negative, not all zero; EstimateError otherwise."""
    items = [x.strip() for x in str(raw).replace("/", ",").split(",") if x.strip()]
    if not items or not all(DECIMAL.fullmatch(x) for x in items):
        raise EstimateError(f"tensor-split: {raw!r} is not a list of numbers")
    split = [float(x) for x in items]
    if not all(math.isfinite(x) for x in split):  # "1e999" is a decimal too
        raise EstimateError(f"tensor-split: {raw!r} has a number too large")
    if any(x < 0 for x in split) or sum(split) <= 0:
        raise EstimateError(f"tensor-split: {raw!r} needs positive proportions")
    return split


def switch(options: dict, name: str) -> bool:
    """A bare flag: on when present (null or true in cli_params), off when absent or false."""
    return name in options and str(options[name]).lower() not in ("false", "0", "off")


def _int(options: dict, name: str, default: int) -> int:
    raw = options.get(name)
    if raw is None:
        return default
    return whole_number(name, raw)


def settings_for(facts: GgufFacts, options: dict, *, on_gpu: bool = True) -> LoadSettings:
    """llama-server's effective settings for these options (its defaults where a flag is missing)."""
    trained = int(facts.key("context_length") or 4096)
    n_ctx = _int(options, "ctx-size", 0) or trained  # 0 or missing: the model's trained context
    if n_ctx < 0:
        raise EstimateError(f"ctx-size: {n_ctx} is negative")
    explicit_np = options.get("parallel") not in (None, -1, "-1")
    n_seq = _int(options, "parallel", -1)
    if n_seq == -1:
        n_seq = 4  # llama-server's "auto": 4 slots sharing one unified cache
    if n_seq < 1:
        raise EstimateError(f"parallel: {n_seq} must be at least 1")
    kv_unified = not explicit_np
    if switch(options, "kv-unified"):
        kv_unified = True
    if switch(options, "no-kv-unified"):
        kv_unified = False
    n_batch = _int(options, "batch-size", 2048)
    n_ubatch = min(_int(options, "ubatch-size", 512), n_batch)
    if n_batch < 1 or n_ubatch < 1:
        raise EstimateError("batch-size and ubatch-size must be at least 1")
    ngl = _int(options, "gpu-layers", -1)
    n_layer = int(facts.key("block_count") or 0)
    if ngl < 0 or ngl > n_layer + 1:  # -1/auto and "99": every layer and the output
        ngl = n_layer + 1
    if not on_gpu:
        ngl = 0
    cache_k = str(options.get("cache-type-k") or "f16").lower()
    cache_v = str(options.get("cache-type-v") or "f16").lower()
    for which, kind in (("cache-type-k", cache_k), ("cache-type-v", cache_v)):
        if kind not in CACHE_TYPES:
            raise EstimateError(f"{which}: unknown cache type {kind!r} (one of {', '.join(CACHE_TYPES)})")
    fa = str(options.get("flash-attn", "auto")).lower()
    if fa not in ("on", "off", "auto", "1", "0", "true", "false", "none"):
        raise EstimateError(f"flash-attn: {fa!r} is not on, off or auto")
    flash_attn = fa not in ("off", "0", "false")
    if not flash_attn and cache_v not in UNQUANTIZED:
        # llama.cpp's llama_context refuses it before allocating anything.
        raise EstimateError(
            f"cache-type-v: a quantized V cache ({cache_v}) requires flash attention "
            "(llama-server: quantized V cache requires flash_attn); use -fa on or auto"
        )
    split_mode = str(options.get("split-mode") or "layer").lower()
    if split_mode not in SPLIT_MODES:
        raise EstimateError(f"split-mode: {split_mode!r} is not one of {', '.join(SPLIT_MODES)}")
    split = None
    if options.get("tensor-split") not in (None, ""):
        split = tensor_split(options["tensor-split"])
    return LoadSettings(
        n_ctx=n_ctx,
        n_gpu_layers=ngl,
        cache_k=cache_k,
        cache_v=cache_v,
        flash_attn=flash_attn,
        n_seq=n_seq,
        kv_unified=kv_unified,
        n_batch=n_batch,
        n_ubatch=min(n_ubatch, n_ctx) if n_ctx else n_ubatch,
        split_mode=split_mode,
        tensor_split=split,
        kv_offload=not switch(options, "no-kv-offload"),
        swa_full=switch(options, "swa-full"),
    )
