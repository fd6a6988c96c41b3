"""Starting llama-server for an instance and waiting until it is healthy: its argument list, port,
environment, log file and instance tag. No status changes here: load.py decides them; a start that finds the
instance no longer `starting` raises Cancelled."""

import logging
import os
import secrets
import time
from pathlib import Path
from typing import NamedTuple

from django.conf import settings
from django.db import IntegrityError, transaction

from gpus.models import Gpu
from utilities.dbutil import read, update

from .binaries import BinaryError, binary_for_load, catalogue_for, catalogue_of_path
from .flags import RUN_TIMEOUT, Catalogue
from .lease import lease_seconds, lease_until, renew_lease
from .models import GpuInstance, InstanceGpu
from .processes import (
    ENV_API_KEY,
    ENV_INSTANCE_ID,
    ENV_INSTANCE_LOG,
    StartError,
    exit_code_of,
    health_status,
    is_alive,
    launch,
    port_is_free,
    scrubbed_env,
    signal_note,
    tagged_processes,
)
from .registry import RegistryError, check_model_path, cli_args

logger = logging.getLogger(__name__)

Status = GpuInstance.Status

PORT_ATTEMPTS = 3  # another program may take the port between our check and llama-server's bind


class Launched(NamedTuple):
    """A process this start launched."""

    pid: int
    create_time: float


class Cancelled(Exception):
    """The instance left `starting` while we were starting it (an unload or switch came in). `launched`: a
    process this start launched but could not record (the unload had already run): nobody else will stop it."""

    def __init__(self, launched: Launched | None = None):
        super().__init__(launched)
        self.launched = launched


# --- log files and tags --------------------------------------------------------------------------------


def log_prefix(host_name: str) -> str:
    return str(Path(settings.INSTANCE_LOG_DIR) / f"{host_name}-instance-")


def log_path_for(instance: GpuInstance) -> Path:
    return Path(f"{log_prefix(instance.host.name)}{instance.pk}.log")


def find_tagged(instance: GpuInstance) -> int | None:
    """The pid of a live llama-server started for this very instance, if any."""
    expected = str(log_path_for(instance))
    for pid, (instance_id, log) in tagged_processes().items():
        if instance_id == instance.pk and log == expected:
            return pid
    return None


# --- argument list, port, environment ---------------------------------------------------------------


def build_argv(
    binary: str,
    model_path: str,
    cli_params: dict,
    port: int,
    gpu_count: int,
    *,
    catalogue: Catalogue | None = None,
    alias: str = "",
) -> list[str]:
    """llama-server's argument list: the registry's flags in the spellings the binary knows (RegistryError
    when one is refused), then what the controller owns: model, address, port and the model id as alias.
    The API key goes in the environment (instance_env), never in the argument list that `ps` shows."""
    catalogue = catalogue or Catalogue(catalogue_of_path(binary))
    argv = [binary, *cli_args(cli_params, catalogue, model_path)]
    argv += ["-m", str(model_path), "--host", settings.LLAMA_SERVER_HOST, "--port", str(port)]
    if alias:
        argv += ["--alias", alias]
    split = catalogue.by_spelling.get("--split-mode")
    used = [catalogue.resolve(name).option for name in cli_params or {}]
    if gpu_count > 1 and split is not None and split not in used:
        argv += ["--split-mode", "layer"]
    return argv


def gpu_uuids(instance: GpuInstance) -> list[str]:
    """The UUIDs of the instance's GPUs in its order (one plain statement, utilities.dbutil.read: on every
    load's way)."""
    rows = read(
        "SELECT {g.uuid} FROM {link} INNER JOIN {g} ON {g.id} = {link.gpu} "
        "WHERE {link.instance} = %s ORDER BY {link.position}",
        {"link": InstanceGpu, "g": Gpu},
        [instance.pk],
    )
    return [uuid for (uuid,) in rows]


def claim_port(instance: GpuInstance, avoid: set[int] = frozenset(), **fields) -> int:
    """A port of PORT_RANGE that no active instance of the host holds and nothing listens on, recorded on
    the instance (with `fields`, in the same UPDATE). The database's unique constraint refuses a port that
    another active instance holds (a running one's is in use anyway: the bind test skips it), so no read of
    the held ports comes first. Cancelled when the instance is no longer `starting`."""
    low, high = settings.PORT_RANGE
    for port in range(low, high + 1):
        if port in avoid or not port_is_free(port):
            continue
        try:
            with transaction.atomic():
                claimed = update(
                    GpuInstance, {"port": port, **fields}, {"pk": instance.pk, "status": Status.STARTING}
                )
        except IntegrityError:
            continue  # another active instance holds it (one starting has not bound it yet)
        if not claimed:
            raise Cancelled()
        instance.port = port
        return port
    raise StartError(
        f"no free port in {low}-{high}: every port is held by an instance or in use by another program "
        "(widen LLAMACONTROLLER_PORT_RANGE)"
    )


def instance_env(instance: GpuInstance, gpu_uuids: list[str], log_path: Path) -> dict[str, str]:
    """The scrubbed environment (processes.scrubbed_env: no secrets of the controller) plus the GPUs, the
    instance's tags and its API key."""
    env = scrubbed_env()
    # UUIDs, not indices: CUDA numbers devices fastest-first, NVML by PCI bus.
    env["CUDA_VISIBLE_DEVICES"] = ",".join(gpu_uuids)
    env[ENV_INSTANCE_ID] = str(instance.pk)
    env[ENV_INSTANCE_LOG] = str(log_path)
    if instance.api_key:
        env[ENV_API_KEY] = instance.api_key
    return env


# --- health --------------------------------------------------------------------------------------------


# llama-server writes one of these once it answers /health with 200 (its log is the instance's log file):
# "model loaded", then "listening on http://…" (newer) or "server is listening on … - starting the main loop"
# (older). A mark seen early only costs one /health request more; one never seen, the poll's pause.
READY_MARKS = (b"model loaded", b"listening on http", b"starting the main loop")
LOG_WATCH = 0.001  # how often the log's size is looked at (a stat, far cheaper than an HTTP request)
HEALTH_POLL_FIRST, HEALTH_POLL_MAX = 0.005, 0.05  # /health itself: every 5 ms at first, then less often


def wait_until_healthy(instance: GpuInstance, deadline: float) -> None:
    """Until /health says 200, renewing the instance's lease as it goes. StartError when the process exits
    or the deadline passes, Cancelled when the instance leaves `starting`. /health is asked on a schedule
    that starts at 5 ms and grows, and at once when llama-server's log says it is ready (READY_MARKS): a
    small model is ready ~30 ms after its start, and a slow poll would add to every load."""
    pause, next_poll, next_renewal = HEALTH_POLL_FIRST, 0.0, 0.0
    began = time.monotonic()
    renew_every = min(1.0, lease_seconds() / 4)
    log = _LogWatch(instance.log_path)
    while True:
        now = time.monotonic()
        if now >= next_poll or log.saw(READY_MARKS):
            if health_status(instance.port) == 200:
                return
            if not is_alive(instance.pid, instance.process_create_time):
                code = _wait_exit_code(instance)
                message = f"llama-server exited while loading (exit code {code}{signal_note(code)})"
                raise StartError(message, exit_code=code)
            next_poll = time.monotonic() + pause
            pause = min(pause * 1.2, HEALTH_POLL_MAX)
        if now >= next_renewal:
            if not renew_lease(instance):
                raise Cancelled()
            next_renewal = now + renew_every
        if now >= deadline:
            raise StartError(f"llama-server did not answer /health with 200 within {settings.LOAD_TIMEOUT}s")
        time.sleep(LOG_WATCH if now - began < 2.0 else 10 * LOG_WATCH)  # a long load: less often


class _LogWatch:
    """What a log file gains from now on, searched for marks (which may be split across two reads)."""

    def __init__(self, path: str):
        self.path = path
        self.offset = self._size()
        self.tail = b""

    def _size(self) -> int:
        try:
            return os.stat(self.path).st_size
        except OSError:
            return 0

    def saw(self, marks: tuple[bytes, ...]) -> bool:
        """Whether one of the marks was written since the last call."""
        size = self._size()
        if size <= self.offset:
            self.offset = min(self.offset, size)  # cut by cap_log: go on from its new end
            return False
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read(size - self.offset)
        except OSError:
            return False
        self.offset += len(data)
        text = self.tail + data
        self.tail = text[-(max(map(len, marks)) - 1) :]  # the start of a mark that the next read completes
        return any(mark in text for mark in marks)


def _wait_exit_code(instance: GpuInstance) -> int | None:
    # The reaper thread records the code a moment after the process exits.
    for _ in range(20):
        code = exit_code_of(instance.pid, instance.log_path)
        if code is not None:
            return code
        time.sleep(0.01)
    return None


# --- the start -----------------------------------------------------------------------------------------


def starting_lease():
    """The lease an instance takes on to `starting` (load.py): long enough for a first read of its binary's
    catalogue (--version and --help, each up to RUN_TIMEOUT) before start_and_wait renews it."""
    return lease_until(2 * RUN_TIMEOUT)


def start_and_wait(instance: GpuInstance) -> None:
    """Start llama-server for a `starting` instance (its binary, model file and flags checked first, a fresh API
    key, a free port) and wait until it is healthy: StartError when it cannot, Cancelled when the instance
    leaves `starting`. A port taken between our check and the bind is tried again with another one."""
    model = instance.model
    # Reading a binary's catalogue (first use, or the file changed) runs --version and --help: the lease the
    # instance took on to `starting` (starting_lease) covers their time-outs; the port's claim brings it back
    # to its usual length. No write of its own before the launch: each one added to every load.
    try:
        binary = binary_for_load(instance.host, model.binary if model.binary_id else None)
    except BinaryError as exc:
        raise StartError(str(exc)) from None
    catalogue = catalogue_for(binary)
    try:
        model_path = check_model_path(model.path)
    except RegistryError as exc:
        raise StartError(f"model file: {exc}") from None
    try:  # the flags were checked when the entry was saved; the binary may have changed since
        cli_args(model.cli_params, catalogue, model_path)
    except RegistryError as exc:
        raise StartError(f"cli_params: {exc}") from None
    # Only the controller may call the instance: a fresh key per start (written with the port), never shown
    # to people.
    instance.api_key = secrets.token_urlsafe(32)
    uuids = gpu_uuids(instance)
    log_path = log_path_for(instance)
    deadline = time.monotonic() + settings.LOAD_TIMEOUT
    tried: set[int] = set()
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = claim_port(instance, avoid=tried, api_key=instance.api_key, lease_expires_at=lease_until())
        argv = build_argv(
            binary.path, str(model_path), model.cli_params, port, len(uuids), catalogue=catalogue,
            alias=model.pk,
        )  # fmt: skip
        pid, create_time = launch(argv, env=instance_env(instance, uuids, log_path), log_path=log_path)
        recorded = update(
            GpuInstance,
            {"pid": pid, "process_create_time": create_time, "argv": argv, "log_path": str(log_path),
             "lease_expires_at": lease_until()},
            {"pk": instance.pk, "status": Status.STARTING},
        )  # fmt: skip
        if not recorded:
            raise Cancelled(Launched(pid, create_time))  # an unload came first: this process is nobody's
        instance.pid, instance.process_create_time, instance.argv = pid, create_time, argv
        instance.log_path = str(log_path)
        try:
            wait_until_healthy(instance, deadline)
            return
        except StartError:
            # Another program took the port between our check and llama-server's bind: try another one.
            if attempt < PORT_ATTEMPTS and not is_alive(pid, create_time) and not port_is_free(port):
                logger.warning("instance %s: port %s was taken meanwhile, retrying", instance.pk, port)
                tried.add(port)
                continue
            raise
