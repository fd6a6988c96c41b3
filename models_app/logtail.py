"""The tail of an instance's log file, read safely: bounded size, only files under the log folder,
undecodable bytes replaced, a missing file answered with a message rather than an error."""

from pathlib import Path

from django.conf import settings

TAIL_BYTES = 64 * 1024


def read_tail(log_path: str, max_bytes: int = TAIL_BYTES) -> tuple[str, str | None]:
    """(text, problem): the last `max_bytes` of the log, starting at a line boundary; `problem` says why
    there is no text (no log yet, not on this machine, unreadable)."""
    if not log_path:
        return "", "This instance has no log file yet."
    path = Path(log_path)
    try:
        resolved = path.resolve()
    except OSError as exc:
        return "", f"Log file unreadable: {exc.strerror or exc}"
    # The path comes from the database: read only inside the controller's log folder.
    if not resolved.is_relative_to(Path(settings.INSTANCE_LOG_DIR).resolve()):
        return "", f"{log_path} is outside the log folder ({settings.INSTANCE_LOG_DIR})."
    try:
        with resolved.open("rb") as handle:
            size = handle.seek(0, 2)
            start = max(0, size - max_bytes)
            handle.seek(start)
            data = handle.read(max_bytes)
    except FileNotFoundError:
        return "", "The log file is not on this machine (the instance may run on another host)."
    except OSError as exc:
        return "", f"Log file unreadable: {exc.strerror or exc}"
    text = data.decode("utf-8", errors="replace")
    if start > 0 and "\n" in text:
        text = text.split("\n", 1)[1]  # drop the partial first line
    return text, None
