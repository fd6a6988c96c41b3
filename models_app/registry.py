"""The model registry's rules: model files live inside the allowed folders, llama-server flags are data
checked against the binary's own flag catalogue (models_app/flags.py) and an allowlist, and GGUF headers
give the facts shown to people.

Flag rules (README, "llama-server binaries and flags"): a name resolves to a spelling the binary knows;
flags the controller sets, flags that reach the network or run programs, and flags that write files are
refused; every value that names an input file must resolve inside LLAMACONTROLLER_MODEL_DIRS, as the
model path must."""

import os
import re
from pathlib import Path

from django.conf import settings

from .binaries import BinaryError, catalogues_for_model
from .estimator import EstimateError, GgufFacts, gguf_facts
from .flags import Catalogue, FlagError
from .models import ModelConfig

FLAG_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")

# Set by the controller for every instance (model, address, API key, log, alias, the HTTP root).
OWNED_FLAGS = {
    "--model", "--host", "--port", "--api-key", "--api-key-file", "--log-file", "--path", "--alias",
    "--ssl-key-file", "--ssl-cert-file", "--api-prefix", "--reuse-port", "--log-disable",
}  # fmt: skip
# Print something and exit: an instance would never become healthy.
EXIT_FLAGS = {"--help", "--usage", "--version", "--completion-bash", "--list-devices", "--cache-list"}
# Fetch from (or compute on) other machines; the controller serves local files only.
NETWORK_FLAGS = {"--docker-repo", "--offline", "--rpc", "--hf-token"}
NETWORK_PREFIXES = ("--hf-", "-hf", "--spec-draft-hf")
# Let the model run programs, read the filesystem or call other hosts, or run the router that starts
# servers of its own.
TOOL_FLAGS = {
    "--tools", "--tools-runtime", "--agent", "--mcp-servers-config", "--mcp-servers-json", "--ui-mcp-proxy",
    "--webui-mcp-proxy", "--video-ffmpeg-dir", "--models-dir", "--models-preset",
}  # fmt: skip
# Write files on the host. Refused rather than redirected: a path the controller picked would still be a
# place that requests could fill (slot saves), and nothing in the controller cleans it up.
WRITE_FLAGS = {"--slot-save-path", "--lookup-cache-dynamic", "--log-prompts-dir", "--prompt-cache"}


class RegistryError(ValueError):
    """A registry entry that cannot be accepted; the message says what is wrong."""


def check_allowed_path(raw: str, *, base: Path | None = None, directory: bool = False) -> Path:
    """The resolved path (symlinks followed) of an existing, readable file (or folder) inside
    LLAMACONTROLLER_MODEL_DIRS. Relative paths are relative to `base`."""
    if not raw or not str(raw).strip():
        raise RegistryError("path is empty")
    path = Path(raw).expanduser()
    if not path.is_absolute() and base is not None:
        path = base / path
    resolved = path.resolve()
    if not any(resolved.is_relative_to(folder) for folder in settings.MODEL_DIRS):
        allowed = ", ".join(str(f) for f in settings.MODEL_DIRS)
        raise RegistryError(f"{raw}: outside the allowed model folders ({allowed})")
    if not resolved.exists():
        raise RegistryError(f"{raw}: {'folder' if directory else 'file'} not found")
    if directory:
        if not resolved.is_dir():
            raise RegistryError(f"{raw}: not a folder")
        return resolved
    if not resolved.is_file():
        raise RegistryError(f"{raw}: not a regular file")
    try:
        with resolved.open("rb"):
            pass
    except OSError as exc:
        raise RegistryError(f"{raw}: not readable ({exc.strerror})") from None
    return resolved


def check_model_path(raw: str, *, base: Path | None = None) -> Path:
    """The resolved path of a readable .gguf file inside LLAMACONTROLLER_MODEL_DIRS. A relative path is looked
    up in `base` (the import's YAML folder) and then in each model folder in order; the first existing file
    is taken (none existing: the first candidate's error)."""
    if not raw or not str(raw).strip():
        raise RegistryError("path is empty")
    if Path(raw).suffix.lower() != ".gguf":
        raise RegistryError(f"{raw}: not a .gguf file")
    if not Path(raw).expanduser().is_absolute():
        folders = [base] if base is not None else []
        folders += [Path(f) for f in settings.MODEL_DIRS]
        found = next((f / raw for f in folders if (f / raw).exists()), None)
        raw = str(found or folders[0] / raw) if folders else raw
    resolved = check_allowed_path(raw)
    with resolved.open("rb") as handle:
        magic = handle.read(4)
    if magic != b"GGUF":
        raise RegistryError(f"{raw}: not a GGUF file (bad magic bytes)")
    return resolved


def check_model_path_form(raw: str) -> Path:
    """check_model_path without touching the file: a .gguf path inside LLAMACONTROLLER_MODEL_DIRS, by its
    text (normalised) or with whatever symlinks this node has followed. For a node that need not have the file
    (the web node of a cluster); each host's worker checks the file itself (models_app/model_files.py)."""
    if not raw or not str(raw).strip():
        raise RegistryError("path is empty")
    path = Path(os.path.normpath(Path(raw).expanduser()))
    if path.suffix.lower() != ".gguf":
        raise RegistryError(f"{raw}: not a .gguf file")
    inside = any(p.is_relative_to(folder) for p in (path, path.resolve()) for folder in settings.MODEL_DIRS)
    if not path.is_absolute() or not inside:
        allowed = ", ".join(str(f) for f in settings.MODEL_DIRS)
        raise RegistryError(f"{raw}: outside the allowed model folders ({allowed})")
    return path


def check_params_shape(params) -> dict:
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
        values = value if isinstance(value, list) else [value]
        if isinstance(value, list) and not value:
            raise RegistryError(f"flag {name!r}: an empty list")
        for item in values:
            if item is not None and not isinstance(item, str | int | float | bool):
                raise RegistryError(f"flag {name!r}: value {item!r} is not a string, number or boolean")
            if isinstance(item, str) and "\x00" in item:
                raise RegistryError(f"flag {name!r}: value contains a NUL byte")
    return params


def refusal(option: dict) -> str | None:
    """Why the allowlist refuses this catalogue option, or None when it may be configured."""
    names = set(option["names"])
    if names & OWNED_FLAGS:
        return "is set by the controller and cannot be configured"
    if names & EXIT_FLAGS:
        return "prints and exits: it is not a server setting"
    help_text = option.get("help", "").lower()
    if (
        names & NETWORK_FLAGS
        or any(n.startswith(NETWORK_PREFIXES) or n.endswith("-url") for n in names)
        or "download" in help_text
    ):
        return "fetches from the network; put the files inside the model folders instead"
    if names & TOOL_FLAGS:
        return "lets the server run programs, reach other hosts or start servers of its own"
    if names & WRITE_FLAGS:
        return "writes files on the host and is not allowed"
    return None


def _file_value(name: str, option: dict, value: str, base: Path | None) -> str:
    """A file flag's value with every path checked and made absolute. `a.gguf,b.gguf` lists several;
    `FNAME:SCALE` (the *-scaled flags) carries a scale after the last colon."""
    scaled = ":" in option.get("metavar", "")
    checked = []
    for part in value.split(","):
        path, scale = part, ""
        if scaled and ":" in part:
            path, scale = part.rsplit(":", 1)
            scale = f":{scale}"
        try:
            resolved = check_allowed_path(path.strip(), base=base, directory=option.get("directory", False))
        except RegistryError as exc:
            raise RegistryError(f"flag '{name}': {exc}") from None
        checked.append(f"{resolved}{scale}")
    return ",".join(checked)


def cli_args(params, catalogue: Catalogue, model_path: str | Path | None = None) -> list[str]:
    """`{"c": 4096, "ngl": 99, "lora": ["a.gguf", "b.gguf"]}` -> `["-c", "4096", "-ngl", "99", "--lora",
    "/models/a.gguf", "--lora", "/models/b.gguf"]`: each name in the spelling the binary knows, checked
    against the allowlist; null (or true) gives a bare switch, false leaves it out, a list repeats the flag.
    Relative file values are relative to the model file's folder. RegistryError says what is wrong."""
    base = Path(model_path).parent if model_path else (settings.MODEL_DIRS or [None])[0]
    args: list[str] = []
    for name, value in check_params_shape(params).items():
        try:
            flag = catalogue.resolve(name)
            reason = refusal(flag.option)
            if reason:
                raise RegistryError(f"flag '{name}' ({flag.spelling}) {reason}")
            occurrences = catalogue.value_words(name, flag, value)
        except FlagError as exc:
            raise RegistryError(str(exc)) from None
        for words in occurrences or []:
            if flag.option.get("file") and words:
                words = [_file_value(name, flag.option, words[0], base)]
            args += [flag.spelling, *words]
    return args


def used_options(params, catalogue: Catalogue) -> list[dict]:
    """The catalogue options that cli_params set (after cli_args accepted them)."""
    return [catalogue.resolve(name).option for name in (params or {})]


def check_cli_params(params, *, binary=None, model_path: str | Path | None = None) -> dict:
    """Accept cli_params only when every flag passes cli_args against the catalogue of each llama-server
    the entry may run on (its pinned binary, else every host's default)."""

    params = check_params_shape(params)
    if not params:
        return params
    try:
        catalogues = catalogues_for_model(binary)
    except BinaryError as exc:
        raise RegistryError(f"cannot check the flags: {exc}") from None
    for catalogue in catalogues:
        cli_args(params, catalogue, model_path)
    return params


def model_file(raw: str, *, base: Path | None = None) -> dict:
    """The one way every entry point (admin, REST API, import_models) takes a model path: resolved and checked
    (check_model_path: relative paths inside the model folders), with the facts read from the file. Returns
    the fields to save: path, gguf_metadata, file_size_bytes."""
    resolved = check_model_path(raw, base=base)
    limit = ModelConfig._meta.get_field("path").max_length
    if len(str(resolved)) > limit:
        raise RegistryError(f"{raw}: the resolved path is longer than {limit} characters")
    return {"path": str(resolved), **file_facts(resolved)}


def reported_model_file(raw: str, facts: dict, size_bytes: int) -> dict:
    """model_file for a file that a host's worker found and reported (the web node need not have it): the
    path's form checked as a load checks it on the web node (check_model_path_form), the facts and size as
    the worker read them. The host's worker checks the file itself once it is registered."""
    path = check_model_path_form(raw)
    limit = ModelConfig._meta.get_field("path").max_length
    if len(str(path)) > limit:
        raise RegistryError(f"{raw}: the path is longer than {limit} characters")
    return {"path": str(path), "gguf_metadata": dict(facts or {}), "file_size_bytes": int(size_bytes)}


def file_facts(path: Path) -> dict:
    """The registry fields read from a model file: its GGUF header facts and its size."""
    return {"gguf_metadata": read_gguf_facts(path), "file_size_bytes": Path(path).stat().st_size}


def read_gguf_facts(path: Path) -> dict:
    """A few header facts (architecture, layers, context, parameters); {} when the header is unreadable. Read by
    the header-only parser (models_app/estimator/gguf_header.py): no tensor data, no walk over the vocabulary in
    Python."""
    try:
        header = gguf_facts(path)
    except (OSError, EstimateError):  # a truncated or foreign file: the facts stay empty, loading reports it
        return {}
    return header_facts(header)


def header_facts(header: GgufFacts) -> dict:
    """read_gguf_facts of a parsed header (a host's worker reports these for the files it finds)."""

    def scalar(key):
        value = header.metadata.get(key)
        return value if isinstance(value, str | int | float) and not isinstance(value, bool) else None

    arch = header.architecture
    facts = {
        "architecture": arch,
        "name": scalar("general.name"),
        "file_type": scalar("general.file_type"),
        "tensor_count": len(header.tensors),
        "parameter_count": header.parameter_count,
        "block_count": scalar(f"{arch}.block_count"),
        "context_length": scalar(f"{arch}.context_length"),
        "embedding_length": scalar(f"{arch}.embedding_length"),
    }
    return {k: v for k, v in facts.items() if v is not None}
