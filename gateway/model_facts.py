"""What Ollama's listings say about a model (/api/tags, /api/ps, /api/show) from the registry's GGUF facts,
and how Ollama's model names map to registry ids. Plain functions (no Django, no I/O)."""

import hashlib

LATEST = ":latest"


# --- names ----------------------------------------------------------------------------------------------


def model_id_of(name: str) -> str:
    """`gemma3:latest` and `gemma3` name the same registry entry."""
    return name[: -len(LATEST)] if name.endswith(LATEST) else name


def tagged(model_id: str) -> str:
    return model_id if ":" in model_id else model_id + LATEST


# --- facts ----------------------------------------------------------------------------------------------


def parameter_size(count) -> str:
    """Ollama's style: 8.0B, 268.10M, 51.20K."""
    if not count:
        return ""
    count = int(count)
    if count >= 1_000_000_000:
        return f"{count / 1e9:.1f}B"
    if count >= 1_000_000:
        return f"{count / 1e6:.2f}M"
    if count >= 1_000:
        return f"{count / 1e3:.2f}K"
    return str(count)


def quantization_level(file_type) -> str:
    """GGUF general.file_type (an enum number) as Ollama names it: Q4_K_M, F16, F32."""
    if file_type is None:
        return ""
    try:
        from gguf import LlamaFileType  # imported when first asked: it brings numpy into the web worker

        name = LlamaFileType(int(file_type)).name
    except (ValueError, TypeError, ImportError):
        return str(file_type)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def digest(path: str, size) -> str:
    """A stable sha256 for /api/tags: of the file's path and size as registered (no file read, so any web
    worker answers the same without reaching the GPU host's disk). It changes when either changes."""
    return hashlib.sha256(f"{path}\n{size or 0}".encode()).hexdigest()


def details(gguf_metadata: dict) -> dict:
    arch = (gguf_metadata or {}).get("architecture") or ""
    return {
        "parent_model": "",
        "format": "gguf",
        "family": arch,
        "families": [arch] if arch else None,
        "parameter_size": parameter_size((gguf_metadata or {}).get("parameter_count")),
        "quantization_level": quantization_level((gguf_metadata or {}).get("file_type")),
    }


def model_info(gguf_metadata: dict) -> dict:
    """/api/show's model_info, in Ollama's GGUF key style, from the header facts the registry keeps."""
    facts = gguf_metadata or {}
    arch = facts.get("architecture")
    info = {}
    if arch:
        info["general.architecture"] = arch
    if facts.get("parameter_count") is not None:
        info["general.parameter_count"] = facts["parameter_count"]
    if facts.get("file_type") is not None:
        info["general.file_type"] = facts["file_type"]
    if facts.get("name"):
        info["general.name"] = facts["name"]
    for key in ("block_count", "context_length", "embedding_length"):
        if arch and facts.get(key) is not None:
            info[f"{arch}.{key}"] = facts[key]
    return info
