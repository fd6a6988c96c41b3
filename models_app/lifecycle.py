"""Running llama-server for an instance: launch, health, stop, adopt. Called by the worker of the instance's
host (tasks.py); never inside an HTTP request. Every status change goes through state.transition()."""

import logging
import secrets
import time
from datetime import timedelta
from pathlib import Path

import psutil
from django.conf import settings
from django.db import IntegrityError, InterfaceError, OperationalError, connection, transaction
from django.utils import timezone

from gpus.models import Gpu
from gpus.services import executable_of, why_not_orphan

from .binaries import BinaryError, binary_for_load, catalogue_for, catalogue_of_path, known_paths
from .events import record
from .flags import RUN_TIMEOUT, Catalogue
from .models import GpuInstance, InstanceEvent
from .processes import (
    ENV_API_KEY,
    ENV_INSTANCE_ID,
    ENV_INSTANCE_LOG,
    StartError,
    create_time_of,
    exit_code_of,
    health_status,
    is_alive,
    launch,
    log_tail,
    note_failure,
    port_is_free,
    scrubbed_env,
    stop_process,
    tagged_processes,
)
from .registry import RegistryError, check_model_path, cli_args
from .state import transition

logger = logging.getLogger(__name__)

Status = GpuInstance.Status
Kind = InstanceEvent.Kind

PORT_ATTEMPTS = 3  # another program may take the port between our check and llama-server's bind


class Cancelled(Exception):
    """The instance left `starting` while we were starting it (an unload or switch came in)."""


# --- the lease -----------------------------------------------------------------------------------------
# The worker that loads, resumes or stops an instance keeps `lease_expires_at` in the future while it works;
# reconcile treats an instance whose lease ran out as abandoned (its worker died) and converges it at once.


def lease_seconds() -> float:
    """About one reconcile interval (2 s to 10 s): an abandoned start is noticed by the pass after next."""
    return float(max(2, min(settings.RECONCILE_SECONDS, 10)))


def lease_until(extra: float = 0.0):
    return timezone.now() + timedelta(seconds=lease_seconds() + extra)


def renew_lease(instance: GpuInstance, status: str = Status.STARTING) -> bool:
    """Push the lease forward while the instance is still in `status`; False when it left it."""
    until = lease_until()
    renewed = GpuInstance.objects.filter(pk=instance.pk, status=status).update(lease_expires_at=until)
    if renewed:
        instance.lease_expires_at = until
    return bool(renewed)


def lease_expired(instance: GpuInstance) -> bool | None:
    """True when a lease was held and ran out, False while one is held, None when there is none."""
    if instance.lease_expires_at is None:
        return None
    return instance.lease_expires_at <= timezone.now()


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


def claim_port(instance: GpuInstance, avoid: set[int] = frozenset()) -> int:
    """A port of PORT_RANGE that no active instance of the host holds and nothing listens on, recorded on
    the instance. The database's unique constraint settles two workers picking the same port."""
    low, high = settings.PORT_RANGE
    held = set(
        GpuInstance.objects.filter(host_id=instance.host_id, status__in=GpuInstance.ACTIVE_STATUSES)
        .exclude(pk=instance.pk)
        .exclude(port=None)
        .values_list("port", flat=True)
    )
    for port in range(low, high + 1):
        if port in held or port in avoid or not port_is_free(port):
            continue
        try:
            with transaction.atomic():
                claimed = GpuInstance.objects.filter(pk=instance.pk, status=Status.STARTING).update(port=port)
        except IntegrityError:
            continue  # another worker took it a moment ago
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


def wait_until_healthy(instance: GpuInstance, deadline: float) -> None:
    """Poll /health until 200, renewing the instance's lease as it goes. StartError when the process exits
    or the deadline passes, Cancelled when the instance leaves `starting`."""
    pause, next_renewal = 0.02, 0.0
    renew_every = min(1.0, lease_seconds() / 4)
    while True:
        if not is_alive(instance.pid, instance.process_create_time):
            code = _wait_exit_code(instance)
            raise StartError(f"llama-server exited while loading (exit code {code})", exit_code=code)
        if health_status(instance.port) == 200:
            return
        now = time.monotonic()
        if now >= next_renewal:
            if not renew_lease(instance):
                raise Cancelled()
            next_renewal = now + renew_every
        if now >= deadline:
            raise StartError(f"llama-server did not answer /health with 200 within {settings.LOAD_TIMEOUT}s")
        time.sleep(pause)
        pause = min(pause * 1.5, 0.05)  # cheap to ask; a slow poll would add to every load


def _wait_exit_code(instance: GpuInstance) -> int | None:
    # The reaper thread records the code a moment after the process exits.
    for _ in range(20):
        code = exit_code_of(instance.pid, instance.log_path)
        if code is not None:
            return code
        time.sleep(0.01)
    return None


# --- the load, as the worker runs it -------------------------------------------------------------------


def last_change(instance: GpuInstance, kind: str | None = None):
    """When the instance last changed (its newest event, of `kind` if given)."""
    events = instance.events.filter(kind=kind) if kind else instance.events.all()
    event = events.order_by("-created_at", "-id").first()
    return event.created_at if event else instance.requested_at


def stop(pid: int, create_time: float | None, timeout: float | None = None) -> str | None:
    """Stop the process (group). None when it is gone, else why it is not."""
    try:
        if stop_process(pid, create_time, timeout=timeout):
            return None
    except PermissionError as exc:
        return f"not allowed to stop pid {pid}: {exc.strerror or exc}"
    return f"pid {pid} survived SIGKILL"


def fail(
    instance: GpuInstance,
    message: str,
    *,
    exit_code: int | None = None,
    expected=None,
    event_kind: str = Kind.FAILED,
) -> bool:
    """Mark the instance failed with the message and its log tail; no process is left behind (or the
    message says why one is)."""
    pids = [(instance.pid, instance.process_create_time)] if instance.pid else []
    tagged = find_tagged(instance) if instance.host_id else None
    if tagged and tagged != instance.pid:
        pids.append((tagged, create_time_of(tagged)))
    for pid, create_time in pids:
        problem = stop(pid, create_time, timeout=2)
        if problem:
            message = f"{message}; {problem}"
    tail = log_tail(instance.log_path)
    error = f"{message}\n--- last lines of the log ---\n{tail}" if tail else message
    logger.warning("instance %s failed: %s", instance.pk, message)
    return transition(
        instance,
        Status.FAILED,
        expected=expected or [Status.PENDING, Status.STARTING],
        event_kind=event_kind,
        detail=message,
        error=error,
        exit_code=exit_code,
        stopped_at=timezone.now(),
        lease_expires_at=None,
    )


def _unexpected(exc: Exception) -> str:
    return f"unexpected error: {type(exc).__name__}: {exc}"


def _give_up(instance: GpuInstance, exc: Exception, **kwargs) -> None:
    """A load or resumed start that hit an unexpected error ends failed with it. The cause goes into the log
    first: if the database is what failed, the row cannot take it now, and the reconcile pass that settles
    the instance later names it from the log (not "the worker ... was lost")."""
    message = _unexpected(exc)
    note_failure(log_path_for(instance), message)
    try:
        fail(instance, message, **kwargs)
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            raise  # the caller's transaction went with the connection
        connection.close()  # a dropped connection: a new one may work at once
        try:
            fail(instance, message, **kwargs)
        except (OperationalError, InterfaceError):
            logger.exception("instance %s: the failure could not be recorded", instance.pk)


def load_instance(instance_id: int) -> None:
    """Start llama-server for a pending instance and see it healthy. Idempotent: an instance that is not
    pending (already started, running, or stopped) is left alone."""
    instance = GpuInstance.objects.select_related("model", "host").filter(pk=instance_id).first()
    if instance is None or instance.status != Status.PENDING:
        return
    try:
        _load(instance)
    except Exception as exc:  # whatever went wrong, the instance ends in a definite state
        logger.exception("load of instance %s failed", instance.pk)
        _give_up(instance, exc)


def _load(instance: GpuInstance) -> None:
    # A switch hands the GPUs over while the old instances are still stopping: stop them first, holding a
    # lease on the new one for as long as that may take.
    stopping = GpuInstance.objects.filter(status=Status.STOPPING, gpu_links__gpu__in=instance.gpus.all())
    old_ones = list(stopping.exclude(pk=instance.pk).distinct().values_list("pk", flat=True))
    if old_ones:
        GpuInstance.objects.filter(pk=instance.pk, status=Status.PENDING).update(
            lease_expires_at=lease_until(len(old_ones) * (settings.STOP_TIMEOUT + 10))
        )
    for old in old_ones:
        unload_instance(old)
    where = f"{instance.host.name} GPU {instance.gpu_ids}"
    if not transition(
        instance, Status.STARTING, expected=[Status.PENDING], event_kind=Kind.STARTED, detail=f"on {where}",
        lease_expires_at=lease_until(),
    ):  # fmt: skip
        return
    try:
        _start_and_wait(instance)
    except Cancelled as cancelled:
        _finish_cancelled(instance, launched=cancelled.args[0] if cancelled.args else None)
        return
    except StartError as exc:
        fail(instance, str(exc), exit_code=exc.exit_code)
        return
    _mark_running(instance, detail=f"pid {instance.pid}, port {instance.port}")


def resume_start(instance_id: int) -> None:
    """Finish a start whose worker died: the process (adopted) is waited for until healthy."""
    instance = GpuInstance.objects.select_related("model", "host").filter(pk=instance_id).first()
    if instance is None or instance.status != Status.STARTING or not instance.pid:
        return
    try:
        remaining = settings.LOAD_TIMEOUT - seconds_since_start(instance)
        wait_until_healthy(instance, time.monotonic() + max(remaining, 1.0))
    except Cancelled:
        _finish_cancelled(instance)
        return
    except StartError as exc:
        fail(instance, str(exc), exit_code=exc.exit_code, expected=[Status.STARTING])
        return
    except Exception as exc:
        logger.exception("resumed start of instance %s failed", instance.pk)
        _give_up(instance, exc, expected=[Status.STARTING])
        return
    _mark_running(
        instance, detail=f"pid {instance.pid}, port {instance.port} (adopted after a worker restart)"
    )


def seconds_since_start(instance: GpuInstance) -> float:
    return (timezone.now() - last_change(instance, Kind.STARTED)).total_seconds()


def _start_and_wait(instance: GpuInstance) -> None:
    model = instance.model
    # Reading a binary's catalogue (first use, or the file changed) runs --version and --help: the lease
    # covers their time-outs, then goes back to its usual length.
    GpuInstance.objects.filter(pk=instance.pk, status=Status.STARTING).update(
        lease_expires_at=lease_until(2 * RUN_TIMEOUT)
    )
    try:
        binary = binary_for_load(instance.host, model.binary if model.binary_id else None)
    except BinaryError as exc:
        raise StartError(str(exc)) from None
    if not renew_lease(instance):
        raise Cancelled()
    catalogue = catalogue_for(binary)
    try:
        model_path = check_model_path(model.path)
    except RegistryError as exc:
        raise StartError(f"model file: {exc}") from None
    try:  # the flags were checked when the entry was saved; the binary may have changed since
        cli_args(model.cli_params, catalogue, model_path)
    except RegistryError as exc:
        raise StartError(f"cli_params: {exc}") from None
    # Only the controller may call the instance: a fresh key per start, never shown to people.
    instance.api_key = secrets.token_urlsafe(32)
    if not GpuInstance.objects.filter(pk=instance.pk, status=Status.STARTING).update(
        api_key=instance.api_key
    ):
        raise Cancelled()
    uuids = list(instance.gpu_links.order_by("position").values_list("gpu__uuid", flat=True))
    log_path = log_path_for(instance)
    deadline = time.monotonic() + settings.LOAD_TIMEOUT
    tried: set[int] = set()
    for attempt in range(1, PORT_ATTEMPTS + 1):
        port = claim_port(instance, avoid=tried)
        argv = build_argv(
            binary.path, str(model_path), model.cli_params, port, len(uuids), catalogue=catalogue,
            alias=model.pk,
        )  # fmt: skip
        pid, create_time = launch(argv, env=instance_env(instance, uuids, log_path), log_path=log_path)
        recorded = GpuInstance.objects.filter(pk=instance.pk, status=Status.STARTING).update(
            pid=pid, process_create_time=create_time, argv=argv, log_path=str(log_path),
            lease_expires_at=lease_until(),
        )  # fmt: skip
        if not recorded:
            raise Cancelled((pid, create_time))  # an unload came first: this process is nobody's
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


def adopt_running(instance: GpuInstance) -> None:
    """A start whose worker was lost, found healthy: it runs."""
    _mark_running(instance, detail=f"pid {instance.pid}, port {instance.port} (adopted: its worker was lost)")


def _mark_running(instance: GpuInstance, *, detail: str) -> None:
    if not transition(
        instance,
        Status.RUNNING,
        expected=[Status.STARTING],
        event_kind=Kind.HEALTHY,
        detail=detail,
        loaded_at=timezone.now(),
        error="",
        lease_expires_at=None,
    ):
        _finish_cancelled(instance)
        return
    from . import memory

    try:
        memory.measure_after_load(instance)
    except Exception:  # the figure is a nicety: the model is loaded whatever the GPU query does
        logger.exception("post-load memory query failed for instance %s", instance.pk)


def _finish_cancelled(instance: GpuInstance, launched: tuple[int, float] | None = None) -> None:
    """The instance was asked to stop while starting: finish that stop here. `launched`: a process this
    start launched but could not record (the unload had already run): nobody else will stop it."""
    instance.refresh_from_db()
    if launched and launched[0] != instance.pid:
        problem = stop(*launched, timeout=2)
        if problem:
            logger.error("instance %s: %s", instance.pk, problem)
    if instance.status == Status.STOPPING:
        unload_instance(instance.pk)
    elif instance.pid and not instance.is_active:
        stop(instance.pid, instance.process_create_time, timeout=2)


# --- unload --------------------------------------------------------------------------------------------


def unload_instance(instance_id: int, actor=None) -> None:
    """Stop the instance's process and mark it stopped. Idempotent: a stopped instance is left alone, so a
    database connection dropped on the way (a restart, pg_terminate_backend) is closed and the unload tried
    once more on a new one; it goes on from where the first try got."""
    try:
        _unload_instance(instance_id, actor)
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            raise  # the caller's transaction is lost with the connection: only the caller can start over
        logger.warning("unload of instance %s: database connection lost; trying again", instance_id)
        connection.close()
        _unload_instance(instance_id, actor)


def _unload_instance(instance_id: int, actor) -> None:
    instance = GpuInstance.objects.select_related("host").filter(pk=instance_id).first()
    if instance is None:
        return
    try:
        _unload(instance, actor)
    except (OperationalError, InterfaceError):
        raise  # nothing can be recorded on a lost connection (unload_instance tries again)
    except Exception as exc:  # whatever went wrong, the instance does not stay `stopping`
        logger.exception("unload of instance %s failed", instance.pk)
        _unload_failed(instance, _unexpected(exc), actor)


def _unload(instance: GpuInstance, actor) -> None:
    if (
        instance.status == Status.RUNNING
        and instance.pid
        and not is_alive(instance.pid, instance.process_create_time)
    ):
        # It died before anybody asked it to stop: that is a crash, with its exit code (not restarted: it
        # was to stop anyway).
        record_crash(instance)
        return
    if instance.status in (Status.PENDING, Status.STARTING, Status.RUNNING):
        # Called without a request (e.g. the admin's kill): ask first, as a request would.
        transition(
            instance,
            Status.STOPPING,
            expected=[instance.status],
            event_kind=Kind.UNLOAD_REQUESTED,
            actor=actor,
        )
    if instance.status != Status.STOPPING:
        return
    # The stop may take STOP_TIMEOUT and then the SIGKILL's wait: hold the instance that long.
    GpuInstance.objects.filter(pk=instance.pk, status=Status.STOPPING).update(
        lease_expires_at=lease_until(settings.STOP_TIMEOUT + 5)
    )
    pids = [(instance.pid, instance.process_create_time)] if instance.pid else []
    # Launched but not yet recorded (the start was racing this stop): found by its tag.
    tagged = find_tagged(instance)
    if tagged and tagged != instance.pid:
        pids.append((tagged, create_time_of(tagged)))
    problems = [problem for pid, create_time in pids if (problem := stop(pid, create_time))]
    if problems:
        _unload_failed(instance, "could not stop llama-server: " + "; ".join(problems), actor)
        return
    code = exit_code_of(instance.pid, instance.log_path) if instance.pid else None
    if transition(
        instance,
        Status.STOPPED,
        expected=[Status.STOPPING],
        event_kind=Kind.UNLOADED,
        actor=actor,
        detail=f"exit code {code}" if code is not None else "",
        stopped_at=timezone.now(),
        exit_code=code,
        lease_expires_at=None,
    ):
        refresh_memory(instance.host.name)


def _unload_failed(instance: GpuInstance, message: str, actor) -> None:
    logger.error("instance %s: %s", instance.pk, message)
    if transition(
        instance,
        Status.FAILED,
        expected=[Status.STOPPING],
        event_kind=Kind.FAILED,
        actor=actor,
        detail=message,
        error=message,
        stopped_at=timezone.now(),
        lease_expires_at=None,
    ):
        refresh_memory(instance.host.name)


def record_crash(instance: GpuInstance, expected=(Status.RUNNING,)) -> bool:
    """The instance's process is gone unasked: `crashed` with its exit code and the end of its log."""
    code = exit_code_of(instance.pid, instance.log_path)
    message = f"llama-server (pid {instance.pid}) exited unexpectedly" + (
        f" with code {code}" if code is not None else ""
    )
    tail = log_tail(instance.log_path)
    if not transition(
        instance,
        Status.CRASHED,
        expected=expected,
        event_kind=Kind.CRASHED,
        detail=message,
        error=f"{message}\n--- last lines of the log ---\n{tail}" if tail else message,
        exit_code=code,
        stopped_at=timezone.now(),
    ):
        return False
    logger.warning("instance %s crashed: %s", instance.pk, message)
    refresh_memory(instance.host.name)
    return True


def refresh_memory(host_name: str) -> None:
    """Refresh the host's GPU figures now, so that pages show the change at once."""
    from . import memory

    try:
        memory.refresh_host_memory(host_name)
    except Exception:  # a telemetry hiccup must not undo an unload
        logger.exception("memory refresh of %s failed", host_name)


# --- orphans ------------------------------------------------------------------------------------------


def owned_pids(host) -> set[int]:
    """Every pid in the process trees of the host's active instances (one scan of the process table)."""
    from gpus.telemetry import process_trees

    rows = GpuInstance.objects.filter(
        host=host, status__in=GpuInstance.ACTIVE_STATUSES, pid__isnull=False
    ).values_list("pid", "process_create_time")
    live = [pid for pid, create_time in rows if is_alive(pid, create_time)]
    return set().union(*process_trees(live).values())


def kill_orphan(host, pid: int, actor=None, gpu_id: int | None = None) -> str:
    """Kill an orphan llama-server (its process group) after checking all of it again, right before the
    kill: the GPU's telemetry, read afresh, lists the pid as an orphan (on GPU `gpu_id`; any of the host's
    when None), its executable is one of the host's llama-server binaries, no active instance owns it, and
    the pid is still the process first looked at (its create time). Returns what was done; writes an
    ORPHAN_KILLED event when it killed."""
    try:
        proc = psutil.Process(pid)
        create_time = proc.create_time()
    except psutil.Error:
        return f"pid {pid} is not running on {host.name}"
    refresh_memory(host.name)  # the telemetry as of now
    gpus = Gpu.objects.filter(host=host).select_related("host")
    reasons = [why_not_orphan(gpu, pid) for gpu in (gpus.filter(pk=gpu_id) if gpu_id else gpus)]
    if None not in reasons:
        why = reasons[0][1] if reasons else f"no such GPU on {host.name}"
        return f"pid {pid} left alone: {why}"
    if executable_of(pid) not in known_paths(host.name):
        return f"pid {pid} on {host.name} is not running one of the host's llama-server binaries: left alone"
    if pid in owned_pids(host):
        return f"pid {pid} on {host.name} belongs to an active instance: unload it instead"
    if create_time_of(pid) != create_time:
        return f"pid {pid} on {host.name} is another process since it was checked: left alone"
    try:
        described = " ".join(proc.cmdline())[:300]
    except psutil.Error:
        described = "llama-server"
    problem = stop(pid, create_time)
    message = f"killed orphan pid {pid} on {host.name}: {described}"
    if problem:
        message = f"{problem} on {host.name}: {described}"
    record(Kind.ORPHAN_KILLED, actor=actor, detail=message)
    refresh_memory(host.name)
    return message
