"""The bytes a load needs, per GPU and on the host: weights, KV cache, compute buffer and the CUDA context,
from the GGUF header's facts and the load's settings (settings.py). The formulas are listed in the package's
docstring (models_app/estimator/__init__.py) and README "Memory prediction". Plain Python (no Django)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .gguf_header import EstimateError, GgufFacts
from .settings import CACHE_TYPES, LoadSettings, settings_for

MIB = 1024 * 1024
# The CUDA context and cuBLAS workspace that llama.cpp does not report: 250-460 MiB per device in published
# measurements (gguf-parser's 250 MiB footprint, llama.cpp PR #15860's ~451 MiB, Ollama's 457 MiB).
DEFAULT_CUDA_OVERHEAD_MIB = 300
# Which layers use the sliding window, per architecture: a function of the layer index.
SWA_PATTERNS = {
    "gemma2": lambda il: il % 2 == 0,
    "gemma3": lambda il: (il + 1) % 6 != 0,  # 5 of every 6 layers slide
    "gemma3n": lambda il: (il + 1) % 5 != 0,
    "cohere2": lambda il: (il + 1) % 4 != 0,
    "llama4": lambda il: (il + 1) % 4 != 0,
}
KV_PAD = 256


@dataclass
class DeviceEstimate:
    """One GPU's share, in bytes."""

    weights: int = 0
    kv: int = 0
    compute: int = 0
    overhead: int = 0
    layers: list[int] = field(default_factory=list)  # block indexes; n_layer stands for the output layer
    output: bool = False

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.compute + self.overhead


@dataclass
class Estimate:
    """A load's predicted memory: per GPU (in the order of the load's GPUs) and on the host."""

    devices: list[DeviceEstimate]
    host: DeviceEstimate
    settings: LoadSettings
    notes: list[str]

    @property
    def gpu_total(self) -> int:
        return sum(d.total for d in self.devices)

    def as_dict(self) -> dict:
        """Plain values in MiB (two decimals), for the API and the stored breakdown."""

        def mib(v):
            return round(v / MIB, 2)

        def part(d):
            return {
                "weights_mib": mib(d.weights),
                "kv_mib": mib(d.kv),
                "compute_mib": mib(d.compute),
                "overhead_mib": mib(d.overhead),
                "total_mib": mib(d.total),
                "layers": len(d.layers) - int(d.output),  # repeating blocks; the output layer is apart
                "output_layer": d.output,
            }

        return {
            "gpus": [part(d) for d in self.devices],
            "host": part(self.host),
            "total_gpu_mib": mib(self.gpu_total),
            "settings": asdict(self.settings),
            "notes": list(self.notes),
        }


def _per_layer(facts: GgufFacts, n_layer: int) -> tuple[list[int], int, int]:
    """Bytes of each block, of the output layer (output + output_norm) and of what stays on the host
    (token_embd and anything outside blocks that is not output)."""
    layers = [0] * n_layer
    output = host = 0
    for name, size in facts.tensors.items():
        if name.startswith("blk."):
            try:
                il = int(name.split(".")[1])
            except ValueError:
                host += size
                continue
            if 0 <= il < n_layer:
                layers[il] += size
            else:
                host += size
        elif name.startswith(("output.", "output_norm.")):
            output += size
        else:
            host += size
    return layers, output, host


def _per_layer_value(raw, n_layer: int, default: int) -> list[int]:
    if raw is None:
        return [default] * n_layer
    if isinstance(raw, list):
        return [int(x) for x in raw[:n_layer]] + [int(raw[-1])] * max(0, n_layer - len(raw))
    return [int(raw)] * n_layer


def _row_bytes(kind: str, elements: int) -> int:
    block, size = CACHE_TYPES[kind]
    return elements // block * size


def kv_layout(facts: GgufFacts, s: LoadSettings) -> tuple[list[int], list[bool]]:
    """Bytes of the KV cache of each layer, and which layers slide."""
    n_layer = int(facts.key("block_count") or 0)
    n_embd = int(facts.key("embedding_length") or 0)
    heads = _per_layer_value(facts.key("attention.head_count"), n_layer, 0)
    heads_kv = _per_layer_value(facts.key("attention.head_count_kv"), n_layer, heads[0] if heads else 0)
    head_dim = n_embd // heads[0] if heads and heads[0] else 0
    key_len = int(facts.key("attention.key_length") or head_dim)
    value_len = int(facts.key("attention.value_length") or head_dim)
    for which, kind, size in (("K", s.cache_k, key_len), ("V", s.cache_v, value_len)):
        block = CACHE_TYPES[kind][0]
        if size and size % block:
            raise EstimateError(
                f"{which} cache type {kind} with block size {block} does not divide the head size {size} "
                "(llama-server refuses it)"
            )
    n_swa = int(facts.key("attention.sliding_window") or 0)
    pattern = SWA_PATTERNS.get(facts.architecture)
    sliding = [bool(n_swa and pattern and pattern(il) and not s.swa_full) for il in range(n_layer)]
    if s.kv_unified:
        full_cells = s.n_ctx
        swa_cells = min(full_cells, _pad(n_swa * s.n_seq + s.n_ubatch))
    else:
        per_seq = s.n_ctx // s.n_seq
        full_cells = per_seq * s.n_seq
        swa_cells = min(per_seq, _pad(n_swa + s.n_ubatch)) * s.n_seq
    sizes = []
    for il in range(n_layer):
        if heads_kv[il] == 0:  # a layer without attention (recurrent, or a shared-KV layer)
            sizes.append(0)
            continue
        cells = swa_cells if sliding[il] else full_cells
        k = _row_bytes(s.cache_k, key_len * heads_kv[il])
        v = _row_bytes(s.cache_v, value_len * heads_kv[il])
        sizes.append(cells * (k + v))
    return sizes, sliding


def _pad(n: int) -> int:
    return (n + KV_PAD - 1) // KV_PAD * KV_PAD


def compute_bytes(facts: GgufFacts, s: LoadSettings) -> int:
    """The compute buffer of one device: ggml's allocator sizes it for the graph's busiest moment, while the
    attention masks (one per KV cache, f16 with flash attention, f32 without) live through the whole graph.
    The busiest moment is the largest of three phases, each proportional to the micro-batch:

    - the gated FFN: gate, up and their product, n_ff wide each, plus one more that the allocator cannot
      reuse once the attention's smaller tensors took its place, and the residual stream;
    - the attention: with flash attention the Q/K/V projections beside the FFN's inputs; without it the f32
      scores of all heads over the largest cache, plus the projections;
    - the output: the logits of one token per slot (llama-server reserves n_parallel outputs) and the
      final hidden states.

    Fitted to llama-server's logged buffers on this project's CPU build (the 8B-shaped header, Gemma 3 270M
    and the tiny model, at micro-batches 64-1024 and contexts 512-16384: docs/benchmarks.md); the
    coefficients are fits, not llama.cpp's code."""
    n_embd = int(facts.key("embedding_length") or 0)
    n_ff_raw = facts.key("feed_forward_length") or 4 * n_embd
    n_ff = max(n_ff_raw) if isinstance(n_ff_raw, list) else int(n_ff_raw)
    n_layer = int(facts.key("block_count") or 0)
    heads = max(_per_layer_value(facts.key("attention.head_count"), n_layer, 1) or [1])
    head_dim = n_embd // heads if heads else 0
    key_len = int(facts.key("attention.key_length") or head_dim)
    q_dim = heads * key_len
    ub = s.n_ubatch
    sizes, sliding = kv_layout(facts, s)
    full_cells = s.n_ctx if s.kv_unified else s.n_ctx // s.n_seq
    caches = [full_cells] if not all(sliding) else []
    if any(sliding):
        n_swa = int(facts.key("attention.sliding_window") or 0)
        caches.append(min(full_cells, _pad(n_swa * (s.n_seq if s.kv_unified else 1) + ub)))
    # Floats per micro-batch token, doubled to keep the halves integral.
    ffn = ub * 2 * (8 * n_ff + 3 * n_embd)  # 4 n_ff + 1.5 n_embd, in f32
    output = _vocab(facts) * s.n_seq * 4 + ub * 4 * 5 * n_embd
    if s.flash_attn:
        masks = sum(cells * ub * 2 for cells in caches)
        attention = ub * 4 * (2 * n_ff + 2 * n_embd + 4 * q_dim)
    else:
        masks = sum(cells * ub * 4 for cells in caches)
        attention = max(caches) * ub * heads * 4 + ub * 2 * (11 * q_dim + 2 * n_embd)  # + 5.5 q + n_embd
    return masks + max(ffn, attention, output)


def estimate(
    facts: GgufFacts,
    options: dict | None = None,
    *,
    gpus: int = 1,
    overhead_mib: float = DEFAULT_CUDA_OVERHEAD_MIB,
) -> Estimate:
    """The memory of a load of `facts` with `options` (memory_options' canonical names) on `gpus` GPUs
    (0: a CPU-only load, everything on the host)."""
    options = options or {}
    s = settings_for(facts, options, on_gpu=gpus > 0)
    n_layer = int(facts.key("block_count") or 0)
    if n_layer <= 0:
        raise EstimateError(f"{facts.path}: no {facts.architecture}.block_count in the header")
    layer_bytes, output_bytes, host_bytes = _per_layer(facts, n_layer)
    tied = "output.weight" not in facts.tensors and "token_embd.weight" in facts.tensors
    kv_sizes, sliding = kv_layout(facts, s)
    compute = compute_bytes(facts, s)
    n_vocab = _vocab(facts)
    notes = []
    host = DeviceEstimate(weights=host_bytes)
    # The logits of the last token of each slot (llama_context's output buffer) live on the host.
    host.compute += n_vocab * 4 * s.n_seq
    devices = [DeviceEstimate(overhead=int(overhead_mib * MIB)) for _ in range(gpus)]
    # Offload from the last layer; the output layer is layer n_layer.
    start = max(n_layer + 1 - s.n_gpu_layers, 0)
    offloaded = list(range(start, n_layer + 1))
    split = s.tensor_split or [1.0] * gpus
    if gpus and len(split) < gpus:
        split = split + [0.0] * (gpus - len(split))
    split = split[:gpus]
    total = sum(split) or 1
    bounds = [sum(split[: i + 1]) / total for i in range(gpus)]
    if gpus and s.split_mode == "none":
        bounds = [1.0] * gpus  # everything on the main GPU (the first)
    for il in range(n_layer + 1):
        is_output = il == n_layer
        size = output_bytes if is_output else layer_bytes[il]
        if is_output and tied and il in offloaded and gpus:
            size += facts.tensors["token_embd.weight"]  # llama.cpp copies token_embd to the output's device
        kv = 0 if is_output else kv_sizes[il]
        if il in offloaded and gpus:
            fraction = (il - start) / len(offloaded)
            dev = next(i for i, b in enumerate(bounds) if fraction < b or i == gpus - 1)
            target = devices[dev]
            target.layers.append(il)
            target.output = target.output or is_output
            target.weights += size
            if s.kv_offload:
                target.kv += kv
            else:
                host.kv += kv
        else:
            host.weights += size
            host.kv += kv
            host.layers.append(il)
            host.output = host.output or is_output
    if gpus:
        used = [d for d in devices if d.layers] or devices[:1]
        for d in used:
            d.compute = compute
        if host.layers or host.output:
            host.compute += compute  # layers left on the CPU run there
        else:
            host.compute += s.n_ubatch * int(facts.key("embedding_length") or 0) * 4  # the embeddings
        if s.n_gpu_layers < n_layer + 1:
            notes.append(f"{n_layer + 1 - s.n_gpu_layers} of {n_layer + 1} layers stay on the host (-ngl)")
    else:
        host.compute += compute
    if any(sliding):
        notes.append(
            f"{sum(sliding)} of {n_layer} layers use a sliding window of {facts.key('attention.sliding_window')}"
        )
    if facts.key("ssm.state_size") or facts.key("expert_count"):
        notes.append("recurrent or MoE keys present: their extra state is not modelled")
    return Estimate(devices=devices, host=host, settings=s, notes=notes)


def _vocab(facts: GgufFacts) -> int:
    tokens = facts.metadata.get("tokenizer.ggml.tokens")
    if isinstance(tokens, dict):
        return int(tokens.get("array_len", 0))
    if isinstance(tokens, list):
        return len(tokens)
    return int(facts.key("vocab_size") or 0)
