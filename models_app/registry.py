"""The model registry's rules: model files live inside the allowed folders, llama-server flags are data
with validated names, and GGUF headers give the facts shown to people."""

import re
from pathlib import Path

from django.conf import settings

FLAG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9-]*$")
# Set by the controller for every instance; a registry entry may not override them.
RESERVED_FLAGS = {"m", "model", "host", "port", "mmproj-url", "hf-repo", "hf-file", "hf-token", "model-url"}


class RegistryError(ValueError):
    """A registry entry that cannot be accepted; the message says what is wrong."""


def check_model_path(raw: str) -> Path:
    """The resolved path of a readable .gguf file inside LLAMACONTROLLER_MODEL_DIRS."""
    if not raw or not str(raw).strip():
        raise RegistryError("path is empty")
    path = Path(raw).expanduser()
    if path.suffix.lower() != ".gguf":
        raise RegistryError(f"{raw}: not a .gguf file")
    resolved = path.resolve()
    if not any(resolved.is_relative_to(folder) for folder in settings.MODEL_DIRS):
        allowed = ", ".join(str(f) for f in settings.MODEL_DIRS)
        raise RegistryError(f"{raw}: outside the allowed model folders ({allowed})")
    if not resolved.exists():
        raise RegistryError(f"{raw}: file not found")
    if not resolved.is_file():
        raise RegistryError(f"{raw}: not a regular file")
    try:
        with resolved.open("rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise RegistryError(f"{raw}: not readable ({exc.strerror})") from None
    if magic != b"GGUF":
        raise RegistryError(f"{raw}: not a GGUF file (bad magic bytes)")
    return resolved


def check_cli_params(params) -> dict:
    """Flag names are plain words (`c`, `n-gpu-layers`), values scalars or lists of scalars."""
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise RegistryError("cli_params must be a mapping of flag names to values")
    for name, value in params.items():
        if not isinstance(name, str) or not FLAG_NAME.match(name):
            raise RegistryError(
                f"bad flag name {name!r}: use letters, digits and dashes, without leading dashes"
            )
        if name in RESERVED_FLAGS:
            raise RegistryError(f"flag {name!r} is set by the controller and cannot be configured")
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            raise RegistryError(f"flag {name!r}: an empty list")
        for item in values:
            if item is not None and not isinstance(item, str | int | float | bool):
                raise RegistryError(f"flag {name!r}: value {item!r} is not a string, number or boolean")
            if isinstance(item, str) and "\x00" in item:
                raise RegistryError(f"flag {name!r}: value contains a NUL byte")
    return params


def cli_args(params: dict) -> list[str]:
    """`{"c": 4096, "no-mmap": None, "lora": ["a", "b"]}` -> `["-c", "4096", "--no-mmap", "--lora", "a",
    "--lora", "b"]`. One-letter names take one dash. True is a bare flag, False leaves it out."""
    args: list[str] = []
    for name, value in check_cli_params(params).items():
        flag = f"-{name}" if len(name) == 1 else f"--{name}"
        for item in value if isinstance(value, list) else [value]:
            if item is None or item is True:
                args.append(flag)
            elif item is False:
                continue
            else:
                args.extend([flag, str(item)])
    return args


def file_facts(path: Path) -> dict:
    """The registry fields read from a model file: its GGUF header facts and its size."""
    return {"gguf_metadata": read_gguf_facts(path), "file_size_bytes": Path(path).stat().st_size}


def read_gguf_facts(path: Path) -> dict:
    """A few header facts (architecture, layers, context, parameters); {} when the header is unreadable."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
    except Exception:  # a truncated or foreign file: the facts stay empty, loading will report the error
        return {}

    def scalar(key):
        field = reader.get_field(key)
        if field is None:
            return None
        value = field.contents()
        return value if isinstance(value, str | int | float) else None

    arch = scalar("general.architecture")
    facts = {
        "architecture": arch,
        "name": scalar("general.name"),
        "file_type": scalar("general.file_type"),
        "tensor_count": len(reader.tensors),
        "parameter_count": int(sum(int(t.n_elements) for t in reader.tensors)),
    }
    if arch:
        facts["block_count"] = scalar(f"{arch}.block_count")
        facts["context_length"] = scalar(f"{arch}.context_length")
        facts["embedding_length"] = scalar(f"{arch}.embedding_length")
    return {k: v for k, v in facts.items() if v is not None}
