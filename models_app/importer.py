"""Import the original LlamaController's model registry file (YAML):

    models:
      - id: tiny
        name: Tiny llama
        path: models/tiny.gguf          # relative paths are relative to the YAML file
        parameters:
          cli_params: {c: 4096, ngl: 99, fa: "on", lora: [a.gguf, b.gguf]}   # files: next to the model
          restart_on_crash: false       # optional
          max_restarts: 3               # optional
          on_demand: true               # optional: anyone with a role may wake it through the gateway
          keep_alive: 30m               # optional: idle time before an unload (seconds or 45s/30m/2h; 0: never)
          allow_anonymous: false        # optional: requests without a token may use it
          exclusive: false              # optional: it wants its GPUs to itself (no other model beside it)
        metadata: {family: llama}

Every entry is checked first; one bad entry rejects the whole file and nothing is written."""

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from django.db import transaction
from django.utils.text import slugify

from .events import record
from .models import InstanceEvent, ModelConfig
from .registry import RegistryError, check_cli_params, model_file


class ImportRejected(Exception):
    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class ImportReport:
    created: list[str] = field(default_factory=list)
    updated: dict[str, list[str]] = field(default_factory=dict)
    unchanged: list[str] = field(default_factory=list)


_DURATION = re.compile(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")
MAX_KEEP_ALIVE = 365 * 24 * 3600


def parse_keep_alive(value) -> int | None:
    """A registry entry's keep_alive: absent/null (the default), seconds, or "45s", "30m", "1h30m";
    0 or a negative number (Ollama's "forever") means never unloaded for idleness (stored as 0)."""
    if value is None:
        return None
    if isinstance(value, bool):
        raise RegistryError("keep_alive must be seconds or a duration such as 30m")
    if isinstance(value, int | float):
        seconds = int(value)
    else:
        text = str(value).strip()
        match = _DURATION.fullmatch(text)
        if text.lstrip("-").isdigit():
            seconds = int(text)
        elif text and match and any(match.groups()):
            hours, minutes, secs = (int(g or 0) for g in match.groups())
            seconds = hours * 3600 + minutes * 60 + secs
        else:
            raise RegistryError(f"keep_alive {value!r} is not seconds or a duration such as 30m")
    if seconds > MAX_KEEP_ALIVE:
        raise RegistryError(f"keep_alive {value!r} is more than a year")
    return max(seconds, 0)


def _entry_values(entry, position: int, base: Path) -> dict:
    label = f"entry {position}"
    if not isinstance(entry, dict):
        raise RegistryError(f"{label}: not a mapping")
    model_id = entry.get("id")
    if not isinstance(model_id, str) or not model_id.strip():
        raise RegistryError(f"{label}: missing id")
    label = f"entry {position} ({model_id})"
    if slugify(model_id) != model_id:
        raise RegistryError(f"{label}: id must be a slug (letters, digits, dashes, underscores)")
    parameters = entry.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise RegistryError(f"{label}: parameters must be a mapping")
    metadata = entry.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise RegistryError(f"{label}: metadata must be a mapping")
    raw_path = entry.get("path")
    if not isinstance(raw_path, str) or not raw_path.strip():
        raise RegistryError(f"{label}: missing path")
    display_name = str(entry.get("name") or model_id)
    for field_name, value in (("id", model_id), ("name", display_name)):
        limit = ModelConfig._meta.get_field(field_name).max_length
        if len(value) > limit:
            raise RegistryError(f"{label}: {field_name} is {len(value)} characters long, at most {limit}")
    try:
        # The registry's one way to take a path (admin and API too); relative: next to the YAML file first.
        file_values = model_file(raw_path, base=base)
        # Checked against the flag catalogue of every host's default llama-server.
        cli_params = check_cli_params(parameters.get("cli_params"), model_path=file_values["path"])
    except RegistryError as exc:
        raise RegistryError(f"{label}: {exc}") from None
    restart = parameters.get("restart_on_crash", False)
    max_restarts = parameters.get("max_restarts", 3)
    if not isinstance(restart, bool):
        raise RegistryError(f"{label}: restart_on_crash must be true or false")
    if not isinstance(max_restarts, int) or isinstance(max_restarts, bool) or not 0 <= max_restarts <= 100:
        raise RegistryError(f"{label}: max_restarts must be an integer from 0 to 100")
    flags = {}
    for name in ("on_demand", "allow_anonymous", "exclusive"):
        flags[name] = parameters.get(name, False)
        if not isinstance(flags[name], bool):
            raise RegistryError(f"{label}: {name} must be true or false")
    try:
        keep_alive = parse_keep_alive(parameters.get("keep_alive"))
    except RegistryError as exc:
        raise RegistryError(f"{label}: {exc}") from None
    return {
        "id": model_id,
        "name": display_name,
        **file_values,
        "cli_params": cli_params,
        "metadata": metadata,
        "restart_on_crash": restart,
        "max_restarts": max_restarts,
        "keep_alive_seconds": keep_alive,
        **flags,
    }


def parse_registry_file(file_path: Path) -> list[dict]:
    """The validated entries of a registry file; ImportRejected lists every problem found."""
    try:
        document = yaml.safe_load(Path(file_path).read_text())
    except OSError as exc:
        raise ImportRejected([f"{file_path}: cannot read ({exc.strerror})"]) from None
    except yaml.YAMLError as exc:
        raise ImportRejected([f"{file_path}: not valid YAML ({exc})"]) from None
    if not isinstance(document, dict) or not isinstance(document.get("models"), list):
        raise ImportRejected([f"{file_path}: expected a top-level 'models:' list"])
    base = Path(file_path).resolve().parent
    entries, problems, seen = [], [], set()
    for position, entry in enumerate(document["models"], start=1):
        try:
            values = _entry_values(entry, position, base)
        except RegistryError as exc:
            problems.append(str(exc))
            continue
        if values["id"] in seen:
            problems.append(f"entry {position} ({values['id']}): duplicate id")
            continue
        seen.add(values["id"])
        entries.append(values)
    if problems:
        raise ImportRejected(problems)
    return entries


def import_registry(file_path: Path, *, dry_run: bool = False) -> ImportReport:
    entries = parse_registry_file(file_path)  # header facts too: file I/O stays outside the transaction
    report = ImportReport()
    with transaction.atomic():
        existing = ModelConfig.objects.in_bulk([v["id"] for v in entries])
        for values in entries:
            current = existing.get(values["id"])
            if current is None:
                report.created.append(values["id"])
                if not dry_run:
                    ModelConfig.objects.create(**values)
                continue
            changed = [name for name, value in values.items() if getattr(current, name) != value]
            if not changed:
                report.unchanged.append(values["id"])
                continue
            report.updated[values["id"]] = changed
            if not dry_run:
                for name in changed:
                    setattr(current, name, values[name])
                current.save()
        if not dry_run and (report.created or report.updated):
            detail = (
                f"import {Path(file_path).name}: created {report.created}, updated {sorted(report.updated)}"
            )
            record(InstanceEvent.Kind.REGISTRY_CHANGED, detail=detail)
    return report
