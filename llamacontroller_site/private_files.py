"""Files only the owner may read (the secret key, the embedded Redis password and URL): created with mode
0600 from the first byte, so there is no moment at which another local user could read them."""

import os
import secrets
from pathlib import Path

PRIVATE = 0o600


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, mode 0600. An existing file is narrowed to 0600 before anything is written."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE)
    try:
        os.fchmod(fd, PRIVATE)
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def create_private(path: Path, text: str) -> bool:
    """Create `path` with `text`, mode 0600, only if it does not exist (False then; it is left alone)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE)
    except FileExistsError:
        return False
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    return True


def private_secret(path: Path, nbytes: int = 32) -> str:
    """The random secret kept in `path`, generated (0600) the first time."""
    create_private(path, secrets.token_urlsafe(nbytes))
    return path.read_text().strip()
