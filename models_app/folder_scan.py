"""The GGUF files a host's worker finds in its own model folders (its LLAMACONTROLLER_MODEL_DIRS), with the facts
of each header, stored per host (HostGgufFile) for the "Add a model" page: in a cluster each GPU host has its own
folders and disk, so the web node cannot list them itself.

A worker scans at start, every LLAMACONTROLLER_MODEL_SCAN_SECONDS (beat's `dispatch_folder_scans`, one task per
live host) and when the page's Rescan asks (`scan_model_folders` on the host's queue). A header is read only for
a file that is new or changed (size or mtime): a periodic scan of an unchanged folder is a walk and a stat per
file. Files that vanished lose their row; a header that cannot be read (a truncated download, random bytes, not
GGUF at all) is listed as unreadable with the reason, never an error of the scan.

Bounded, so that a folder of 100 000 files cannot hang a worker (the scan's note says which bound cut it short):
- depth: MAX_DEPTH folders below each allowed folder;
- entries: MAX_ENTRIES directory entries visited over all folders (files of any kind and folders);
- files: MAX_FILES .gguf files listed;
- time: MAX_SECONDS for the whole scan; headers not read by then are read by the next scan (their files are
  not listed until then).
Paths longer than MAX_PATH or not valid UTF-8 are skipped. Symlinks: a linked folder is not entered; a linked file is listed only when its target resolves inside the
allowed folders and is a regular file (the rule a load applies, models_app/model_files.py)."""

import itertools
import logging
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from gpus.models import Host

from . import estimator
from .models import HostFolderScan, HostGgufFile
from .registry import header_facts

logger = logging.getLogger(__name__)

MAX_DEPTH = 6
MAX_ENTRIES = 20_000
MAX_FILES = 1_000
MAX_SECONDS = 20.0
MAX_PATH = 1000  # HostGgufFile.path's length; longer paths are not listed (the registry could not hold them)


def quantisation(file_type) -> str:
    """GGUF general.file_type as llama.cpp names it (Q4_K_M, F16); the number itself when unknown."""
    from gguf import LlamaFileType  # numpy comes with it: loaded when a header is first read

    try:
        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ValueError, TypeError):
        return "" if file_type is None else str(file_type)


@dataclass
class Walk:
    """The .gguf files found (path -> os.stat_result of the file itself or its target), and what cut it short."""

    files: dict[str, os.stat_result] = field(default_factory=dict)
    limits: list[str] = field(default_factory=list)
    entries: int = 0

    @property
    def complete(self) -> bool:
        return not self.limits


def _storable(path: str) -> bool:
    """A path the registry can hold: at most MAX_PATH characters, valid UTF-8 (a name in another encoding
    reaches Python as surrogates, which no database column takes)."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return len(path) <= MAX_PATH


def _inside(path: Path, folders: list[Path]) -> bool:
    return any(path.is_relative_to(folder) for folder in folders)


def walk(folders: list[Path], deadline: float) -> Walk:
    """The .gguf files under `folders`, within the bounds (depth, entries, files, the deadline)."""
    found = Walk()
    resolved = [Path(f).resolve() for f in folders]
    pending = [(Path(f), 0) for f in reversed(folders)]
    while pending:
        folder, depth = pending.pop()
        try:
            with os.scandir(folder) as entries:
                # at most the entries still allowed (a folder of a million names is not read whole), by name
                left = MAX_ENTRIES - found.entries + 1
                listing = sorted(itertools.islice(entries, max(left, 0)), key=lambda e: e.name)
        except FileNotFoundError:
            continue  # a folder that does not exist (yet) lists nothing
        except OSError as exc:
            found.limits.append(f"{folder}: cannot be read ({exc.strerror})")
            continue
        subfolders = []
        for entry in listing:
            found.entries += 1
            if found.entries > MAX_ENTRIES:
                found.limits.append(f"stopped after {MAX_ENTRIES} folder entries")
                return found
            if time.monotonic() > deadline:
                found.limits.append(f"stopped after {MAX_SECONDS:g} s")
                return found
            try:
                if entry.is_dir(follow_symlinks=False):
                    if depth < MAX_DEPTH:
                        subfolders.append(Path(entry.path))
                    elif not any("deeper than" in note for note in found.limits):
                        found.limits.append(f"folders deeper than {MAX_DEPTH} levels are not scanned")
                    continue
                if not entry.name.lower().endswith(".gguf") or not _storable(entry.path):
                    continue
                if entry.is_symlink():
                    target = Path(entry.path).resolve()
                    if not _inside(target, resolved) or not target.is_file():
                        continue  # a link out of the allowed folders (or to no file) is not followed
                    stat = target.stat()
                elif entry.is_file(follow_symlinks=False):
                    stat = entry.stat(follow_symlinks=False)
                else:
                    continue
            except OSError:
                continue  # gone between the listing and the stat, or a broken link
            if len(found.files) >= MAX_FILES:
                found.limits.append(f"only the first {MAX_FILES} .gguf files are listed")
                return found
            found.files[entry.path] = stat
        pending += [(sub, depth + 1) for sub in reversed(subfolders)]  # depth first, in name order
    return found


FILE_FIELDS = [
    "size_bytes", "modified_at", "architecture", "quantization", "parameter_count", "block_count",
    "context_length", "facts", "header", "error",
]  # fmt: skip


def read_file(path: str, stat: os.stat_result) -> dict:
    """A HostGgufFile's fields for the file at `path`: its header's facts, or `error` when it cannot be read."""
    fields = {
        "size_bytes": stat.st_size,
        "modified_at": datetime.fromtimestamp(stat.st_mtime, tz=UTC),
        "architecture": "", "quantization": "", "parameter_count": None, "block_count": None,
        "context_length": None, "facts": {}, "header": {}, "error": "",
    }  # fmt: skip
    try:
        header = estimator.read_header(path)  # a memory map: the header only, never the tensor data
    except estimator.EstimateError as exc:
        fields["error"] = str(exc).removeprefix(f"{path}: ")
        return fields
    facts = header_facts(header)
    fields.update(
        architecture=header.architecture[:100],
        quantization=quantisation(facts.get("file_type"))[:40],
        parameter_count=header.parameter_count or None,
        block_count=_small_int(facts.get("block_count")),
        context_length=_small_int(facts.get("context_length")),
        facts=facts,
        header=estimator.summary(header),
    )
    return fields


def _small_int(value) -> int | None:
    return value if isinstance(value, int) and 0 <= value < 2**31 else None


def _changed(row: HostGgufFile, stat: os.stat_result) -> bool:
    return row.size_bytes != stat.st_size or abs(row.modified_at.timestamp() - stat.st_mtime) > 1e-3


def scan_on_this_host(host: Host, folders: list[Path] | None = None) -> dict:
    """Run by the host's worker: walk its model folders, read the headers of new and changed files (until the
    time bound), write the rows and remove those of files that are gone. Returns counts, for logs and tests."""
    folders = list(settings.MODEL_DIRS if folders is None else folders)
    started = time.monotonic()
    deadline = started + MAX_SECONDS
    found = walk(folders, deadline)
    rows = {row.path: row for row in HostGgufFile.objects.filter(host=host)}
    now = timezone.now()
    new, changed, unchanged, left = [], [], [], 0
    for path, stat in found.files.items():
        row = rows.get(path)
        if row is not None and not _changed(row, stat):
            unchanged.append(row.pk)
            continue
        if time.monotonic() > deadline:
            left += 1
            continue  # the next scan reads it
        fields = read_file(path, stat)
        if row is None:
            new.append(HostGgufFile(host=host, path=path, seen_at=now, **fields))
        else:
            for name, value in fields.items():
                setattr(row, name, value)
            row.seen_at = now
            changed.append(row)
    limits = list(found.limits)
    if left:
        limits.append(f"{left} headers left for the next scan (time bound {MAX_SECONDS:g} s)")
    gone = [
        row.pk for path, row in rows.items() if path not in found.files and _vanished(path, found, folders)
    ]
    with transaction.atomic():
        if gone:
            HostGgufFile.objects.filter(pk__in=gone).delete()
        if new:
            HostGgufFile.objects.bulk_create(new, ignore_conflicts=True)  # a second scan at the same moment
        if changed:
            HostGgufFile.objects.bulk_update(changed, [*FILE_FIELDS, "seen_at"])
        if unchanged:
            HostGgufFile.objects.filter(pk__in=unchanged).update(seen_at=now)
        HostFolderScan.objects.update_or_create(
            host=host,
            defaults={
                "folders": [str(f) for f in folders],
                "scanned_at": timezone.now(),
                "duration_ms": round((time.monotonic() - started) * 1000, 1),
                "files": len(found.files) - left,
                "note": "; ".join(limits),
            },
        )
    for note in limits:
        logger.warning("%s: model folder scan: %s", host.name, note)
    return {
        "files": len(found.files) - left, "read": len(new) + len(changed), "removed": len(gone),
        "entries": found.entries, "limits": limits,
    }  # fmt: skip


def _vanished(path: str, found: Walk, folders: list[Path]) -> bool:
    """A row the walk did not meet: gone when the walk was complete; after a cut-short walk only when the
    file itself is gone or no longer allowed (the rows are at most MAX_FILES: a bounded number of stats)."""
    if found.complete:
        return True
    target = Path(path).resolve()
    return not (target.is_file() and _inside(target, [Path(f).resolve() for f in folders]))


def mark_requested(hosts: list[Host]) -> None:
    """The page's Rescan asked these hosts: the page polls until each one's scan finishes after now."""
    now = timezone.now()
    for host in hosts:
        HostFolderScan.objects.update_or_create(host=host, defaults={"requested_at": now})
