"""How the run command keeps what it starts on a leash: one run per data folder (a lock held for its
lifetime), children that die with it (a parent-death signal), and a watchdog that stops the llama-servers
when the run command itself dies without stopping them (SIGKILL, a crash).

The llama-servers are started by the worker in their own sessions so that they outlive a worker restart; the
parent-death signal therefore does not reach them. The watchdog is a small process in its own session that
holds the reading end of a pipe: the run command tells it when its worker holds the host name ("claimed")
and when it stopped everything itself ("done"). The pipe's end of file without "done" means the run command
is gone: the watchdog waits for the worker to exit and unloads the host's instances (recorded as usual)."""

import contextlib
import ctypes
import fcntl
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

PR_SET_PDEATHSIG = 1
# The embedded Redis, the web server, the worker and beat are restarted when they die, unless one died this
# often within a minute.
REDIS_RESTARTS_PER_MINUTE = 5
CHILD_RESTARTS_PER_MINUTE = 5
# A worker that exits with EX_CONFIG refused its host name (models_app/tasks.py): a restart cannot help.
EX_CONFIG = 78
_libc = ctypes.CDLL(None, use_errno=True) if sys.platform == "linux" else None

REPO = Path(__file__).resolve().parent.parent


def say(message: str, *, err: bool = False) -> None:
    show(f"[llamacontroller] {message}", sys.stderr if err else sys.stdout)


def show(text: str, stream=None) -> None:
    stream = stream or sys.stdout
    try:
        print(text, file=stream, flush=True)
    except OSError:
        # The terminal is gone (hang-up) or its reader quit (`./lc.sh run | head`): carry on without output,
        # rather than crash past the stop of what this command started.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, stream.fileno())
        os.close(devnull)


def keep_redis_up(server, restarts: list[float]) -> bool:
    """The embedded Redis died (killed, crashed): start it again on the same port with the same password, so
    that every client reconnects by itself. False (stop everything) when it cannot start or keeps dying."""
    if server.process.poll() is None:
        return True
    code = server.process.returncode
    if not restart_allowed(restarts, REDIS_RESTARTS_PER_MINUTE):
        say(f"the embedded Redis exited with code {code}, {len(restarts)} times within a minute: stopping")
        return False
    say(f"the embedded Redis exited with code {code}: restarting it on port {server.port}")
    try:
        server.start()
    except RuntimeError as exc:
        say(f"could not restart the embedded Redis ({exc}; see its log in the data folder): stopping")
        return False
    return True


def restart_allowed(restarts: list[float], per_minute: int) -> bool:
    """Count one more restart in `restarts` (monotonic times); False when that makes more than `per_minute`
    within the last minute."""
    now = time.monotonic()
    restarts[:] = [t for t in restarts if now - t < 60] + [now]
    return len(restarts) <= per_minute


def die_with_parent():
    """A preexec_fn: the child gets SIGTERM when the process that started it dies, by any signal. Loaded
    before the fork (ctypes in the child would allocate); a parent that died before the prctl is caught by
    comparing the parent pid."""
    parent = os.getpid()

    def preexec() -> None:
        if _libc is not None:
            _libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)

    return preexec


class AlreadyRunning(Exception):
    """Another run command holds the data folder."""


def lock_data_folder(data_dir: Path):
    """An exclusive lock on data/run.lock, held (by the returned file) until this process exits, however it
    exits: the kernel releases it. Raises AlreadyRunning naming the holder's pid."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(data_dir / "run.lock", os.O_RDWR | os.O_CREAT, 0o600)
    handle = os.fdopen(fd, "r+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = handle.read().strip() or "?"
        handle.close()
        raise AlreadyRunning(holder) from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


class Supervisor:
    def __init__(self):
        self.children: dict[str, subprocess.Popen] = {}
        self.argvs: dict[str, list[str]] = {}
        self.restarts: dict[str, list[float]] = {}

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        # Each child in its own session: Ctrl-C reaches only this supervisor, which stops them in order.
        # If the supervisor dies instead (SIGKILL), the parent-death signal stops them.
        self.children[name] = subprocess.Popen(
            argv, cwd=REPO, start_new_session=True, preexec_fn=die_with_parent()
        )
        self.argvs[name] = argv
        return self.children[name]

    def restart_exited(self, name: str) -> subprocess.Popen | None:
        """`name` exited: what is left of its group goes, and it starts again with the same arguments. None
        (stop everything) when it refused its configuration or died too often within a minute. A worker's
        llama-servers run in their own sessions and outlive it: the new worker takes them over (its
        start-up reconcile)."""
        code = self.children[name].returncode
        if code == EX_CONFIG or not restart_allowed(
            self.restarts.setdefault(name, []), CHILD_RESTARTS_PER_MINUTE
        ):
            say(f"{name} exited with code {code}; stopping")
            return None
        say(f"{name} exited with code {code}: starting it again")
        self.stop(name)
        return self.start(name, self.argvs[name])

    def first_exited(self) -> str | None:
        return next((name for name, p in self.children.items() if p.poll() is not None), None)

    def stop(self, name: str, timeout: float = 15.0) -> None:
        process = self.children.get(name)
        if process is None:
            return
        if process.poll() is not None:
            # The leader is gone (a worker killed with SIGKILL); what is left of its group goes too (a group's id
            # is not handed out as a pid while the group has members, so this reaches nobody else).
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            return
        try:
            os.killpg(process.pid, signal.SIGTERM)
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        except ProcessLookupError:
            pass


class Watchdog:
    """The run command's side of the watchdog (see the module's docstring)."""

    def __init__(self, log_file: Path, lock):
        """`lock`: the data folder's lock (lock_data_folder). The watchdog holds it too, so that no new run
        starts in the folder while it is still stopping what a dead run left."""
        read_end, self.write_end = os.pipe()  # both not inheritable: only the watchdog gets the read end
        log = open(log_file, "ab")  # noqa: SIM115 (the child keeps its copy)
        try:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "llamacontroller_site.runner", "watchdog", str(read_end), str(os.getpid())],
                cwd=REPO, pass_fds=[read_end, lock.fileno()], stdin=subprocess.DEVNULL, stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # the terminal's Ctrl-C and hang-up are for the run command
            )  # fmt: skip
        finally:
            os.close(read_end)
            log.close()

    def tell(self, line: str) -> None:
        with contextlib.suppress(OSError):  # the watchdog is gone: nothing to tell
            os.write(self.write_end, f"{line}\n".encode())

    def done(self) -> None:
        """Everything is stopped: the watchdog exits without doing anything."""
        self.tell("done")
        os.close(self.write_end)
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()


def watch(read_end: int, runner_pid: int, stop_instances) -> int:
    """The watchdog process: wait for the run command's end; if it ended without "done", stop what it left:
    the host's instances, if its worker held the host name, and the URL file of its embedded Redis."""
    for sig in (signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    worker_pid = None
    with os.fdopen(read_end, "r") as pipe:
        for line in pipe:
            word, _, value = line.strip().partition(" ")
            if word == "done":
                return 0
            if word == "claimed":
                worker_pid = int(value)
    url_file = Path(os.environ["LLAMACONTROLLER_DATA_DIR"]) / "embedded-redis.url"
    with contextlib.suppress(OSError):
        if url_file.read_text() == os.environ.get("REDIS_URL"):  # that run's own server: gone with it
            url_file.unlink()
    if worker_pid is None:
        return 0  # its worker never held the host name: nothing here is this run's to stop
    say(f"the run command (pid {runner_pid}) ended without stopping its models: stopping them")
    # Its worker got SIGTERM with it: the llama-servers are stopped once it no longer starts any.
    with contextlib.suppress(psutil.NoSuchProcess):
        psutil.wait_procs([psutil.Process(worker_pid)], timeout=40)
    stop_instances()
    say("stopped the models of the run command")
    return 0
