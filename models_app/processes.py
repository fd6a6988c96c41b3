"""Plain process helpers for llama-server: start one from an argument list (own session, output to a log
file, reaped by a thread so no zombie is left), tell whether it still runs, stop its process group, read
its log and its /health. No model rows here: launch.py, load.py and stop.py decide what to do with them."""

import http.client
import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import psutil
from django.conf import settings
from django.utils import timezone

# Put in llama-server's environment, so a later worker finds the process even when the one that started it
# died before recording the pid. The log path tells our processes from another controller's on this machine.
ENV_INSTANCE_ID = "LLAMACONTROLLER_INSTANCE_ID"
ENV_INSTANCE_LOG = "LLAMACONTROLLER_INSTANCE_LOG"
# llama-server reads its API key from here (`--api-key`'s environment variable): unlike the argument
# list, a process's environment is readable only by its own user.
ENV_API_KEY = "LLAMA_API_KEY"

# The only variables llama-server inherits from the worker. The worker's own environment holds the
# controller's secrets (SECRET_KEY, DATABASE_URL, REDIS_URL, the admin password) and LLAMA_ARG_* /
# HF_TOKEN would set llama-server flags behind the registry's back; none of them may reach the server.
ENV_KEEP = {"PATH", "HOME", "USER", "LOGNAME", "LANG", "LANGUAGE", "TZ", "TMPDIR", "LD_LIBRARY_PATH"}
ENV_KEEP_PREFIXES = (
    "LC_",  # locale
    "CUDA_",  # NVIDIA runtime (CUDA_VISIBLE_DEVICES itself is set per instance)
    "NVIDIA_",  # container runtime hints
    "GGML_",  # ggml's own switches (GGML_CUDA_*, GGML_VK_*, ...)
    "HIP_",  # AMD ROCm: HIP_VISIBLE_DEVICES, ...
    "ROCR_",
    "HSA_",
    "OMP_",  # thread pools of BLAS builds
)
# Test runs tag every process they start so that teardown can find leftovers (tests/conftest.py).
ENV_KEEP_TEST = "LLAMACONTROLLER_TEST_RUN"


def scrubbed_env(source: dict[str, str] | None = None) -> dict[str, str]:
    """The part of `source` (default: this process's environment) that llama-server may see."""
    source = os.environ if source is None else source
    return {
        name: value
        for name, value in source.items()
        if name in ENV_KEEP or name.startswith(ENV_KEEP_PREFIXES) or name == ENV_KEEP_TEST
    }


LOG_TAIL_LINES = 20
START_MARK = "[llamacontroller] "  # then the time and "starting: [argv]" (launch)
EXIT_MARK = "[llamacontroller] llama-server pid {pid} exited with code {code}"
FAILURE_MARK = "[llamacontroller] the worker gave the load up: "

# Processes this process started, so that they are reaped (no zombies) and their exit codes known.
_children_lock = threading.Lock()
_exit_codes: dict[int, int] = {}


class StartError(Exception):
    """The load failed; the message is for people. `exit_code` when the process exited."""

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        self.exit_code = exit_code


def is_alive(pid: int | None, create_time: float | None) -> bool:
    """The process with this pid and create-time still runs (a zombie counts as dead)."""
    if not pid:
        return False
    try:
        proc = psutil.Process(pid)
        if create_time is not None and abs(proc.create_time() - create_time) > 1.0:
            return False  # the pid was recycled
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
    except psutil.AccessDenied:
        return True


def create_time_of(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


# What a llama-server killed by these signals most likely met, said beside the signal's name.
_SIGNAL_HINTS = {
    "SIGILL": "an instruction this CPU does not allow: the binary was built for another CPU (or for CPU "
    "features, such as AMX, that this machine or its hypervisor does not enable); use a build for this machine",
    "SIGKILL": "killed from outside, often by the kernel's out-of-memory killer",
}


def signal_note(code: int | None) -> str:
    """What to add after an exit code in a message: for a signal (a negative code, as subprocess gives it)
    ": SIGILL, an instruction this CPU does not allow: ..."; empty for a plain exit code."""
    if code is None or code >= 0:
        return ""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        return ""
    hint = _SIGNAL_HINTS.get(name)
    return f": {name}" + (f", {hint}" if hint else "")


def exit_code_of(
    pid: int | None, log_path: str, wait: float = 3.0, create_time: float | None = None
) -> int | None:
    """The exit code if this process (or the worker that started it) saw it: reaped here, or the line the
    reaper appended to the log. A process that is a zombie still is about to be reaped by its parent (the
    pool process that started it, or the worker's main process: models_app/subreaper.py): with its
    `create_time`, its code is read from the zombie itself; without, it is waited for, up to `wait`
    seconds."""
    if not pid:
        return None
    deadline = time.monotonic() + wait
    while True:
        code = _recorded_exit_code(pid, log_path)
        if code is None and create_time is not None:
            code = zombie_exit_code(pid, create_time)
        if code is not None or time.monotonic() >= deadline:
            return code
        if not _is_zombie(pid):
            # Reaped since the read above? Its reaper records the code before it reaps: read once more.
            return _recorded_exit_code(pid, log_path)
        time.sleep(0.001)  # its reaper (another pool process) records it within a millisecond or two


def zombie_exit_code(pid: int, create_time: float) -> int | None:
    """The exit code that the zombie `pid` (started at `create_time`) keeps until its parent reaps it, as
    the reaper decodes it (-N: killed by signal N); None when it is not that zombie. A process exits a few
    milliseconds before its reaper, in another pool process, wakes up and records the code, and an unload
    waits for nothing else. Only for a process of our own user, whose code the kernel does not hide (it
    shows 0 to others), and whose parent is this process or another pool process of this worker: their
    reaper threads reap it at once. Any other parent (one that took it over when a worker died) may take
    longer, and the caller waits for it, so that an instance is not `stopped` while its process is still
    there."""
    try:
        proc = psutil.Process(pid)
        with proc.oneshot():
            if proc.status() != psutil.STATUS_ZOMBIE or proc.uids().effective != os.geteuid():
                return None
            if abs(proc.create_time() - create_time) > 1.0:
                return None  # the pid went to another process
            parent = proc.ppid()
        if parent != os.getpid() and psutil.Process(parent).ppid() != os.getppid():
            return None
        return _zombie_wait_status(pid)
    except (psutil.Error, OSError, ValueError):
        return None


def _zombie_wait_status(pid: int) -> int | None:
    """The exit code in /proc/<pid>/stat's field 52 (Linux 3.5+; psutil does not read it), while the process
    is a zombie still: a zombie's pid is not reused before its parent reaps it."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        stat = handle.read()
    fields = stat[stat.rindex(b")") + 2 :].split()  # after the command name, which may hold anything
    if fields[0] != b"Z" or len(fields) < 50:
        return None
    return os.waitstatus_to_exitcode(int(fields[49]))


def _recorded_exit_code(pid: int, log_path: str) -> int | None:
    with _children_lock:
        if pid in _exit_codes:
            return _exit_codes[pid]
    prefix = EXIT_MARK.format(pid=pid, code="")
    for line in reversed(log_tail(log_path, 5).splitlines()):
        if line.startswith(prefix):
            try:
                return int(line[len(prefix) :].strip())
            except ValueError:
                return None
    return None


def _is_zombie(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def note_failure(log_path: str | Path, message: str) -> None:
    """Write why the worker gave the load up into the instance's log. When the database is what failed, the
    instance row cannot say so; the reconcile pass that settles the instance later reads it from here."""
    try:
        with open(log_path, "ab") as log:
            log.write(f"{FAILURE_MARK}{message}\n".encode())
    except OSError:
        pass


def failure_note(log_path: str) -> str | None:
    """The reason noted by note_failure since llama-server last started, if any."""
    for line in reversed(log_tail(log_path, 50).splitlines()):
        if line.startswith(FAILURE_MARK):
            return line[len(FAILURE_MARK) :].strip()
        if line.startswith(START_MARK) and " starting: " in line:
            return None
    return None


def log_tail(log_path: str, lines: int = LOG_TAIL_LINES) -> str:
    if not log_path:
        return ""
    try:
        with open(log_path, "rb") as handle:
            size = handle.seek(0, os.SEEK_END)
            handle.seek(max(0, size - 16 * 1024))
            data = handle.read()
    except OSError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def cap_log(log_path: str, max_bytes: int | None = None) -> bool:
    """Keep a log under the cap by cutting it to its newest half. llama-server appends (O_APPEND), so its
    next write lands at the new end. Done by the reconcile pass, so it works whoever started the process."""
    max_bytes = max_bytes or settings.INSTANCE_LOG_MAX_BYTES
    try:
        with open(log_path, "r+b") as handle:
            size = handle.seek(0, os.SEEK_END)
            if size <= max_bytes:
                return False
            handle.seek(size - max_bytes // 2)
            keep = handle.read()
            handle.seek(0)
            handle.write(b"[llamacontroller] log truncated to its last %d bytes\n" % len(keep))
            handle.write(keep)
            handle.truncate()
    except OSError:
        return False
    return True


def tag_of(pid: int) -> tuple[int, str] | None:
    """(instance id, log path) when the process carries our instance tag; None otherwise (or unreadable)."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            data = handle.read()
    except OSError:  # gone, or another user's
        return None
    if ENV_INSTANCE_ID.encode() + b"=" not in data:
        return None
    values = dict(item.split(b"=", 1) for item in data.split(b"\0") if b"=" in item)
    try:
        instance_id = int(values[ENV_INSTANCE_ID.encode()])
    except (KeyError, ValueError):
        return None
    return instance_id, values.get(ENV_INSTANCE_LOG.encode(), b"").decode("utf-8", "replace")


def tagged_processes() -> dict[int, tuple[int, str]]:
    """pid -> (instance id, log path) for every live process carrying our instance tag."""
    found: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        tag = tag_of(int(entry))
        if tag is not None and is_alive(int(entry), None):
            found[int(entry)] = tag
    return found


def launch(argv: list[str], *, env: dict[str, str], log_path: Path) -> tuple[int, float]:
    """The one place that starts processes: an argument list (no shell), output appended to `log_path`,
    in its own session so it outlives the worker. Returns (pid, create_time). The process is reaped by a
    thread of this process when it exits, which also appends its exit code to the log."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"{START_MARK}{timezone.now():%Y-%m-%d %H:%M:%S} starting: {argv!r}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
                close_fds=True,
            )
        except OSError as exc:
            raise StartError(f"cannot start {argv[0]}: {exc.strerror or exc}") from None
    create_time = create_time_of(proc.pid)
    _note_launch(proc.pid, create_time, log_path)
    threading.Thread(target=_reap, args=(proc, log_path), name=f"reap-{proc.pid}", daemon=True).start()
    return proc.pid, create_time or time.time()


def _launch_file(pid: int) -> Path:
    return Path(settings.INSTANCE_LOG_DIR) / ".launched" / str(pid)


def _note_launch(pid: int, create_time: float | None, log_path: Path) -> None:
    """Which log a process started here writes to, by pid: the worker's main process reaps it if this pool
    process dies, and by then the process may be a zombie already, whose environment cannot be read."""
    path = _launch_file(pid)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"{create_time or 0}\n{log_path}\n")
    except OSError:
        pass


def launched_log(pid: int) -> str | None:
    """The log of the llama-server `pid` started by launch(), if it is that very process (not a reused pid)."""
    try:
        created, log_path = _launch_file(pid).read_text().splitlines()[:2]
    except (OSError, ValueError):
        return None
    actual = create_time_of(pid)
    if actual is None or abs(actual - float(created)) > 1.0:
        return None
    return log_path


def _reap(proc: subprocess.Popen, log_path: Path) -> None:
    code = exit_code_keeping_zombie(proc.pid, block=True)
    if code is not None:
        record_exit(proc.pid, code, log_path)
    proc.wait()  # only now is the pid gone: no one sees it neither running nor recorded


def exit_code_keeping_zombie(pid: int, block: bool = False) -> int | None:
    """The exit code of our child `pid` once it has exited, read without reaping it (WNOWAIT): its code is
    recorded while it is still a zombie, so exit_code_of() never finds it gone with no code. None when it
    still runs (block=False) or is not our child."""
    flags = os.WEXITED | os.WNOWAIT | (0 if block else os.WNOHANG)
    try:
        info = os.waitid(os.P_PID, pid, flags)
    except ChildProcessError:
        return None
    if info is None:
        return None
    return info.si_status if info.si_code == os.CLD_EXITED else -info.si_status


def record_exit(pid: int, code: int, log_path: str | Path) -> None:
    """Keep the exit code of a process reaped here, and append it to its log for any other process."""
    _launch_file(pid).unlink(missing_ok=True)
    with _children_lock:
        _exit_codes[pid] = code
        while len(_exit_codes) > 1000:
            _exit_codes.pop(next(iter(_exit_codes)))
    try:
        with open(log_path, "ab") as log:
            log.write((EXIT_MARK.format(pid=pid, code=code) + "\n").encode())
    except OSError:
        pass


def port_is_free(port: int) -> bool:
    """Nothing listens on the port (a bind test, as llama-server will do)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT leftovers do not count
        try:
            sock.bind((settings.LLAMA_SERVER_HOST, port))
        except OSError:
            return False
    return True


def health_status(port: int, timeout: float = 1.0) -> int | None:
    """HTTP status of /health (200 ready, 503 loading), or None when nothing answers. The connection is
    closed after each answer: llama-server, asked to stop, waits about 100 ms for an idle keep-alive
    connection, and a pooled one would stay open to every instance this process ever loaded. Plain
    http.client (never through a proxy): a load asks every few milliseconds while llama-server starts on the
    same cores, and requests cost 1.1 ms of CPU per 200 against 0.4 ms, 0.85 ms per refused connection
    against 0.12 ms (2-core VM)."""
    host = settings.LLAMA_SERVER_HOST
    host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    connection = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        connection.request("GET", "/health", headers={"Connection": "close"})
        response = connection.getresponse()
        response.read()
        return response.status
    except (OSError, http.client.HTTPException):
        return None
    finally:
        connection.close()


def stop_process(
    pid: int | None, create_time: float | None, timeout: float | None = None, while_it_exits=None
) -> bool:
    """SIGTERM to the process group, SIGKILL after `timeout`. True if the process is gone afterwards.
    `while_it_exits`: called once when the process has not exited EXIT_GRACE after the SIGTERM (e.g. a
    write that only a long stop needs: llama-server usually exits within a few milliseconds)."""
    if not pid:
        return True
    timeout = settings.STOP_TIMEOUT if timeout is None else timeout
    exit_fd = _exit_watch(pid, create_time)  # one there: the process runs (checked)
    try:
        if exit_fd is None and not is_alive(pid, create_time):
            return True
        for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
            _signal_group(pid, sig)
            if while_it_exits is not None:
                if _wait_exit(pid, create_time, exit_fd, min(EXIT_GRACE, wait)):
                    return True
                while_it_exits()
                while_it_exits = None
            if _wait_exit(pid, create_time, exit_fd, wait):
                return True
    finally:
        if exit_fd is not None:
            os.close(exit_fd)
    return not is_alive(pid, create_time)


# Without a pidfd (Linux before 5.3, or not allowed) the exit is polled: llama-server exits a few
# milliseconds after SIGTERM, and each poll's pause adds to an unload.
EXIT_POLL = 0.002
# How long a stop waits for the exit before it calls `while_it_exits` (stop_process).
EXIT_GRACE = 0.2


def _exit_watch(pid: int, create_time: float | None) -> int | None:
    """A pidfd of this very process, running (readable once it exits: no polling, whoever its parent is),
    or None."""
    try:
        fd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None
    if not is_alive(pid, create_time):  # gone, or the pid went to another process before the pidfd opened
        os.close(fd)
        return None
    return fd


def _wait_exit(pid: int, create_time: float | None, exit_fd: int | None, wait: float) -> bool:
    """Whether the process is gone within `wait` seconds. A pidfd turns readable when its process exits:
    nothing else to ask then."""
    if exit_fd is not None:
        return bool(select.select([exit_fd], [], [], max(0.0, wait))[0])
    deadline = time.monotonic() + wait
    while True:
        if not is_alive(pid, create_time):
            return True
        left = deadline - time.monotonic()
        if left <= 0:
            return False
        time.sleep(min(EXIT_POLL, left))


def _signal_group(pid: int, sig: int) -> None:
    try:
        # Started with start_new_session: the pid leads its own group, and the group holds its children.
        if os.getpgid(pid) == pid:
            os.killpg(pid, sig)
        else:
            os.kill(pid, sig)
    except ProcessLookupError:
        pass


def is_llama_server(proc: psutil.Process) -> bool:
    try:
        cmdline = proc.cmdline()
        return "llama-server" in proc.name() or bool(
            cmdline and "llama-server" in os.path.basename(cmdline[0])
        )
    except psutil.Error:
        return False
