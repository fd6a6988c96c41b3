"""Which registered models each host can serve. The registry names one path per model; in a cluster every
host's worker checks that path with its own settings (inside its LLAMACONTROLLER_MODEL_DIRS, the file there,
the registered size) and reports it as a HostModelFile row. Loads, placement, the load form and the gateway
then use only hosts that did not report the file missing; a host that has not reported yet is not ruled
out (its worker checks the file again when it loads).

A worker reports at start, at the end of each reconcile pass, and when the registry changes (a ModelConfig
saved: `check_model_files` is sent to every live host on commit)."""

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import connection, transaction
from django.db.models.signals import post_save
from django.utils import timezone

from gpus.models import Host
from utilities.dbutil import select

from . import dispatch
from .models import HostModelFile, ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FileState:
    available: bool
    reason: str = ""
    size_bytes: int | None = None


def check_file(model: ModelConfig, model_dirs: list[Path] | None = None) -> FileState:
    """The model's file as this machine sees it: inside the allowed folders (symlinks followed), a
    readable regular file, of the registered size when the registry knows it."""
    dirs = settings.MODEL_DIRS if model_dirs is None else model_dirs
    raw = model.path or ""
    if not raw.strip():
        return FileState(False, "the registry has no path for it")
    resolved = Path(raw).expanduser().resolve()
    if not any(resolved.is_relative_to(folder) for folder in dirs):
        allowed = ", ".join(str(f) for f in dirs) or "none"
        return FileState(False, f"{raw} is outside the allowed model folders there ({allowed})")
    try:
        stat = resolved.stat()
    except FileNotFoundError:
        return FileState(False, f"{raw} does not exist there")
    except OSError as exc:
        return FileState(False, f"{raw} cannot be read there ({exc.strerror})")
    if not resolved.is_file():
        return FileState(False, f"{raw} is not a regular file there")
    if not os.access(resolved, os.R_OK):
        return FileState(False, f"{raw} is not readable there", stat.st_size)
    if model.file_size_bytes is not None and stat.st_size != model.file_size_bytes:
        return FileState(
            False,
            f"{raw} is {stat.st_size} bytes there, the registry says {model.file_size_bytes}",
            stat.st_size,
        )
    return FileState(True, "", stat.st_size)


FIELDS = ["available", "reason", "size_bytes", "checked_at"]


def check_on_this_host(host: Host) -> dict[str, int]:
    """Run by the host's worker: check every registered model's file and write the rows that changed (new
    ones with one bulk_create, changed ones with one bulk_update). A fixed handful of queries, whatever the
    size of the registry: it runs on every reconcile pass. `checked_at` is when the state last changed.
    Returns counts, for logs and tests."""
    models = list(ModelConfig.objects.only("id", "path", "file_size_bytes"))
    rows = {row.model_id: row for row in HostModelFile.objects.filter(host=host)}
    now = timezone.now()
    new, changed = [], []
    for model in models:
        state = check_file(model)
        row = rows.get(model.pk)
        if row is None:
            new.append(
                HostModelFile(
                    host=host,
                    model=model,
                    available=state.available,
                    reason=state.reason,
                    size_bytes=state.size_bytes,
                    checked_at=now,
                )
            )
        elif (row.available, row.reason, row.size_bytes) != (state.available, state.reason, state.size_bytes):
            row.available, row.reason, row.size_bytes, row.checked_at = (
                state.available, state.reason, state.size_bytes, now,
            )  # fmt: skip
            changed.append(row)
    if new:
        # ignore_conflicts: a second report running at the same moment (start-up and a registry change)
        HostModelFile.objects.bulk_create(new, ignore_conflicts=True)
    if changed:
        HostModelFile.objects.bulk_update(changed, FIELDS)
    for row in new + changed:
        if not row.available:
            logger.warning("%s cannot serve %s: %s", host.name, row.model_id, row.reason)
    return {"created": len(new), "changed": len(changed), "models": len(models)}


# --- the registry changed: every live host checks again now, not at its next reconcile pass -------------


def send_checks() -> int:
    """Send `check_model_files` to every live host's queue. A broker that is down only delays the report
    until the next reconcile pass: never an error for the registry change that asked."""
    hosts = list(Host.objects.up().only("name"))
    dispatch.send_model_file_checks(hosts, expires=settings.RECONCILE_SECONDS, at_once=True)
    return len(hosts)


def _send_checks_later() -> None:
    """Once per transaction: an import that saves many models sends one check per host, not one per model."""
    pending = getattr(connection, "run_on_commit", None) or []
    if any(getattr(entry[1], "model_files_check", False) for entry in pending):
        return

    def callback() -> None:
        callback.model_files_check = False  # sent: a later change sends again
        send_checks()

    callback.model_files_check = True
    transaction.on_commit(callback)


def registry_saved(sender, instance, raw=False, **kwargs) -> None:
    """post_save of ModelConfig (API, admin, YAML import, shell alike). Fixtures (`raw`) send nothing."""
    if not raw:
        _send_checks_later()


def connect() -> None:
    post_save.connect(
        registry_saved, sender=ModelConfig, dispatch_uid="models_app.model_files.registry_saved"
    )


# --- what loads and placement ask -------------------------------------------------------------------------


def refusal(model: ModelConfig, host: Host, known: dict[int, str | None] | None = None) -> str | None:
    """Why `host` cannot serve `model`, by its worker's last report; None when it can or has not said.
    `known`: the model's `reports`, when read already."""
    if known is not None:
        reason = known.get(host.pk)
    else:
        row = HostModelFile.objects.filter(host=host, model=model, available=False).only("reason").first()
        reason = None if row is None else row.reason
    if reason is None:
        return None
    return f"model {model.pk} cannot load on host {host.name}: {reason}"


def reports(model: ModelConfig) -> dict[int, str | None]:
    """Every host's last report on `model`, in one query: host id -> None (it can serve the model) or why
    not. Empty: no host has reported (`reported`)."""
    rows = select(HostModelFile, {"model_id": model.pk}, columns=("host", "available", "reason"))
    return {row.host_id: None if row.available else row.reason for row in rows}


def hosts_without(model: ModelConfig):
    """The ids of the hosts that reported `model`'s file unusable (a values queryset, for a subquery)."""
    return HostModelFile.objects.filter(model=model, available=False).values("host_id")


def missing_on_live_hosts(model: ModelConfig, host: Host | None = None) -> list[tuple[Host, str]]:
    """The live hosts (or just `host`) whose worker reported that it cannot serve `model`, with the reason."""
    rows = HostModelFile.objects.filter(model=model, available=False, host__in=Host.objects.up())
    if host is not None:
        rows = rows.filter(host=host)
    return [(row.host, row.reason) for row in rows.select_related("host").order_by("host__name")]


def hosts_for(model: ModelConfig) -> tuple[list[Host], list[tuple[Host, str]]]:
    """For the load form: the live hosts that may serve `model` (reported the file, or have not reported),
    and those that reported that they cannot, with the reason."""
    missing = missing_on_live_hosts(model)
    ruled_out = {h.pk for h, _ in missing}
    offered = [h for h in Host.objects.up().order_by("name") if h.pk not in ruled_out]
    return offered, missing
