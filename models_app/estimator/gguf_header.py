"""A GGUF header, parsed without reading tensor data: a memory map, scalar keys and short numeric arrays read,
long arrays (tokenizer vocabularies, merges) counted and skipped, the tensor table turned into bytes per tensor
with ggml's block sizes. Plain Python; the facts are cached by path, size and mtime."""

from __future__ import annotations

import math
import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path


class EstimateError(ValueError):
    """The file or the flags cannot be estimated; the message says why."""


_SCALARS = {
    0: "<B",
    1: "<b",
    2: "<H",
    3: "<h",
    4: "<I",
    5: "<i",
    6: "<f",
    7: "<?",
    10: "<Q",
    11: "<q",
    12: "<d",
}
SMALL_ARRAY = 4096  # arrays longer than this (vocabularies, merges) are counted, not read


@dataclass
class GgufFacts:
    """What the estimate needs from a GGUF file."""

    path: str
    architecture: str
    metadata: dict  # scalar keys, and short numeric arrays as lists; long arrays as {"array_len": n}
    tensors: dict  # name -> bytes
    tensor_types: dict = field(default_factory=dict)  # name -> ggml type number
    parameter_count: int = 0  # elements over all tensors

    def key(self, name, default=None):
        return self.metadata.get(f"{self.architecture}.{name}", default)


def _tensor_bytes(type_id: int, dims: list[int]) -> int:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(type_id)]
    except (ValueError, KeyError):
        raise EstimateError(f"unknown ggml tensor type {type_id}") from None
    elements = math.prod(dims)
    return elements // block * size


def read_header(path: str | os.PathLike) -> GgufFacts:
    """Parse a GGUF header (metadata and tensor table) from a memory map without reading tensor data."""
    path = str(path)
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _parse(path, data)
    except (OSError, ValueError, struct.error, OverflowError, MemoryError) as exc:
        # OverflowError, MemoryError: a corrupt header's lengths and counts (up to 2**64) used as sizes
        if isinstance(exc, EstimateError):
            raise
        raise EstimateError(f"{path}: not a readable GGUF header ({exc})") from None


def _parse(path: str, data) -> GgufFacts:
    if data[:4] != b"GGUF":
        raise EstimateError(f"{path}: not a GGUF file")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", data, 4)
    if version < 2:
        raise EstimateError(f"{path}: GGUF version {version} is too old")
    pos = 24
    unpack_from = struct.unpack_from

    def string(at):
        (length,) = unpack_from("<Q", data, at)
        return bytes(data[at + 8 : at + 8 + length]).decode("utf-8", "replace"), at + 8 + length

    def value(kind, at):
        if kind == 8:
            return string(at)
        if kind == 9:
            item_kind, count = unpack_from("<IQ", data, at)
            at += 12
            if item_kind in _SCALARS:
                width = struct.calcsize(_SCALARS[item_kind])
                if count <= SMALL_ARRAY:
                    items = list(unpack_from(f"<{count}{_SCALARS[item_kind][1]}", data, at))
                    return items, at + width * count
                return {"array_len": count}, at + width * count
            if item_kind == 8:  # strings: walk the lengths only
                for _ in range(count):
                    (length,) = unpack_from("<Q", data, at)
                    at += 8 + length
                return {"array_len": count}, at
            raise EstimateError(f"{path}: nested arrays are not supported")
        fmt = _SCALARS.get(kind)
        if fmt is None:
            raise EstimateError(f"{path}: unknown GGUF value type {kind}")
        return unpack_from(fmt, data, at)[0], at + struct.calcsize(fmt)

    metadata = {}
    for _ in range(n_kv):
        key, pos = string(pos)
        (kind,) = unpack_from("<I", data, pos)
        metadata[key], pos = value(kind, pos + 4)
    tensors, types, elements = {}, {}, 0
    for _ in range(n_tensors):
        name, pos = string(pos)
        (n_dims,) = unpack_from("<I", data, pos)
        dims = list(unpack_from(f"<{n_dims}Q", data, pos + 4))
        type_id, _offset = unpack_from("<IQ", data, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        tensors[name] = _tensor_bytes(type_id, dims)
        types[name] = type_id
        elements += math.prod(dims)
    arch = metadata.get("general.architecture")
    if not isinstance(arch, str):
        raise EstimateError(f"{path}: no general.architecture in the header")
    return GgufFacts(
        path=path, architecture=arch, metadata=metadata, tensors=tensors, tensor_types=types,
        parameter_count=elements,
    )  # fmt: skip


_CACHE: dict[tuple, GgufFacts] = {}


def gguf_facts(path: str | os.PathLike) -> GgufFacts:
    """read_header, cached by (path, size, mtime)."""
    stat = os.stat(path)
    key = (str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns)
    facts = _CACHE.get(key)
    if facts is None:
        if len(_CACHE) > 64:
            _CACHE.clear()
        facts = _CACHE[key] = read_header(path)
    return facts


def summary(facts: GgufFacts) -> dict:
    """What the estimate needs of `facts`, small enough to store per file (a few KiB for a 70B model): the
    metadata without the tokenizer's arrays (the vocabulary kept as its length) and the tensor bytes summed per
    block (`blk.N`), the output and embedding tensors by name, everything else as one `other`. The estimate of
    `from_summary(summary(f))` is the estimate of `f`."""
    metadata = {k: v for k, v in facts.metadata.items() if not k.startswith("tokenizer.")}
    tokens = facts.metadata.get("tokenizer.ggml.tokens")
    if tokens is not None:
        count = tokens.get("array_len", 0) if isinstance(tokens, dict) else len(tokens)
        metadata["tokenizer.ggml.tokens"] = {"array_len": int(count)}
    tensors: dict[str, int] = {}
    for name, size in facts.tensors.items():
        parts = name.split(".")
        if name.startswith("blk.") and len(parts) > 1 and parts[1].isdigit():
            key = f"blk.{parts[1]}"
        elif name.startswith(("output.", "output_norm.")) or name == "token_embd.weight":
            key = name
        else:
            key = "other"
        tensors[key] = tensors.get(key, 0) + size
    return {
        "architecture": facts.architecture,
        "metadata": metadata,
        "tensors": tensors,
        "parameter_count": facts.parameter_count,
    }


def from_summary(path: str, data: dict) -> GgufFacts:
    """The GgufFacts of a stored summary(); EstimateError when it is not one."""
    try:
        return GgufFacts(
            path=str(path), architecture=str(data["architecture"]), metadata=dict(data["metadata"]),
            tensors={str(k): int(v) for k, v in data["tensors"].items()},
            parameter_count=int(data.get("parameter_count") or 0),
        )  # fmt: skip
    except (KeyError, TypeError, ValueError, AttributeError):
        raise EstimateError(f"{path}: no header summary") from None
