"""The worker's main process keeps the llama-servers of its pool processes.

A llama-server is started by a Celery pool process (processes.launch), which reaps it and writes its exit code
into its log. When that pool process dies (killed, or recycled), its llama-servers would be re-parented to PID
1, which reaps them silently: a later crash then had no exit code ("exited unexpectedly", nothing more), and
so did every other instance that pool process had started. The worker's main process declares itself a child
subreaper (Linux `PR_SET_CHILD_SUBREAPER`), so they are re-parented to it instead, and `OrphanReaper`, a
thread of the main process, reaps them and writes their exit codes into their logs, where
processes.exit_code_of finds them."""

import contextlib
import ctypes
import logging
import os
import threading

import psutil

from . import processes

logger = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36


def become_subreaper() -> bool:
    """Orphaned descendants of this process are re-parented to it rather than to PID 1 (not inherited by
    children: the pool processes are not subreapers). False where the system does not offer it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0:
            return True
        error = ctypes.get_errno()
    except (OSError, AttributeError) as exc:  # not Linux
        error = exc
    logger.warning("cannot become a child subreaper (%s): exit codes of llama-servers whose pool process died "
                   "will be unknown", error)  # fmt: skip
    return False


class OrphanReaper(threading.Thread):
    """Learns every llama-server below this process (its log path, from the note processes.launch left, or
    from its instance tag while it runs), and when one that is now its own child exits, reaps it and appends
    its exit code to its log. Children of a live pool process are left to that process."""

    def __init__(self, interval: float = 0.5):
        super().__init__(name="llama-server-reaper", daemon=True)
        self.interval = interval
        self.stopped = threading.Event()
        self.known: dict[int, tuple[float, str]] = {}  # pid -> (create time, log path) of tagged descendants
        self.untagged: set[int] = set()  # descendants read already and found untagged (the pool processes)

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.scan()
            except Exception:  # a scan that fails is tried again; the zombies wait meanwhile
                logger.exception("the llama-server reaper's scan failed")

    def stop(self) -> None:
        self.stopped.set()

    def scan(self) -> list[tuple[int, int]]:
        """One pass: learn new descendants, reap the ones that exited. Returns the (pid, exit code) reaped."""
        descendants = psutil.Process().children(recursive=True)
        current = set()
        for child in descendants:
            current.add(child.pid)
            if child.pid in self.known or child.pid in self.untagged:
                continue
            # The launch's note first: one that died before a scan saw it is a zombie, with no environment.
            log_path = processes.launched_log(child.pid) or (processes.tag_of(child.pid) or (0, None))[1]
            created = processes.create_time_of(child.pid)
            if log_path is None or created is None:
                self.untagged.add(child.pid)
            else:
                self.known[child.pid] = (created, log_path)
        self.untagged &= current
        return [reaped for pid in list(self.known) if (reaped := self._reap(pid)) is not None]

    def _reap(self, pid: int) -> tuple[int, int] | None:
        created, log_path = self.known[pid]
        code = processes.exit_code_keeping_zombie(pid)
        if code is None:
            if not processes.is_alive(pid, created):  # not ours (its pool process reaped it), or gone
                del self.known[pid]
            return None
        del self.known[pid]
        processes.record_exit(pid, code, log_path)  # recorded before the pid disappears
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
        logger.warning("llama-server pid %s, inherited from a pool process that died, exited with code %s",
                       pid, code)  # fmt: skip
        return pid, code
