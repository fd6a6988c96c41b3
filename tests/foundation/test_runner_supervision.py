"""The run command's leash on what it starts (issue 16, items 1-5), piece by piece: the data-folder lock, the
parent-death signal, the embedded Redis kept on its port and restarted, `./lc.sh manage`, the one-line
configuration error, and the way out surviving a dropped database connection and a dead llama-server.
The whole run command is exercised in tests/e2e/test_run_command_faults.py."""

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
import redis
from django.db import connection
from django.test import override_settings

from llamacontroller_site import first_run, host_instances, supervision
from llamacontroller_site.embedded_redis import EmbeddedRedis
from llamacontroller_site.supervision import AlreadyRunning, lock_data_folder
from models_app import launch, processes, stop
from models_app.models import GpuInstance, InstanceEvent
from tests.conftest import REPO
from tests.helpers import running_instance, wait_until

Status = GpuInstance.Status


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def clean_env(**extra) -> dict:
    """This environment without the controller's settings (a user's second terminal)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("LLAMACONTROLLER_", "DATABASE_URL", "REDIS_URL", "SECRET_KEY", "DJANGO_"))
    }
    env.update(extra)
    return env


# --- one run per data folder ----------------------------------------------------------------------


def test_second_lock_on_a_data_folder_is_refused_naming_the_holder(tmp_path):
    held = lock_data_folder(tmp_path / "data")
    try:
        with pytest.raises(AlreadyRunning, match=str(os.getpid())):
            lock_data_folder(tmp_path / "data")
    finally:
        held.close()
    lock_data_folder(tmp_path / "data").close()  # released with its holder


def test_second_run_command_is_refused_before_it_does_anything(tmp_path):
    """A run holds the data folder: a second start says why in one line and exits non-zero, having
    printed nothing else and started nothing (no Redis: the folder gets no URL file, no port file)."""
    data = tmp_path / "data"
    held = lock_data_folder(data)
    try:
        result = subprocess.run(
            [sys.executable, "-m", "llamacontroller_site.runner"],
            cwd=REPO, env=clean_env(LLAMACONTROLLER_DATA_DIR=str(data)), capture_output=True, text=True,
            timeout=60,
        )  # fmt: skip
    finally:
        held.close()
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "refusing to start: another ./lc.sh run" in result.stderr
    assert f"pid {os.getpid()}" in result.stderr
    assert sorted(p.name for p in data.iterdir()) == ["run.lock"]


@pytest.mark.django_db(transaction=True)
def test_run_for_a_host_name_a_live_worker_holds_is_refused_before_it_starts_anything(tmp_path):
    """Another data folder, the same database and host name (held by this live process, as a worker would):
    refused in one line, nothing printed or started before, and only its own worker's claim counts."""
    from models_app import cluster
    from tests.conftest import database_url

    cluster.claim("taken-host")
    data = tmp_path / "data"
    result = subprocess.run(
        [sys.executable, "-m", "llamacontroller_site.runner"], cwd=REPO, capture_output=True, text=True,
        env=clean_env(LLAMACONTROLLER_DATA_DIR=str(data), DATABASE_URL=database_url(),
                      LLAMACONTROLLER_HOST_NAME="taken-host"),
        timeout=90,
    )  # fmt: skip
    assert result.returncode == 1
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1
    assert "refusing to start: host name 'taken-host' is held by another worker" in result.stderr
    assert not (data / "embedded-redis.port").exists()
    assert host_instances.worker_claimed(os.getpid()) is False  # settings.HOST_NAME is another host
    with override_settings(HOST_NAME="taken-host"):
        assert host_instances.worker_claimed(os.getpid()) and not host_instances.worker_claimed(
            os.getpid() + 1
        )


def test_lc_sh_without_a_command_prints_its_usage():
    for args in ([], ["bogus"]):
        result = subprocess.run(["./lc.sh", *args], cwd=REPO, capture_output=True, text=True, timeout=30)
        assert result.returncode == 2
        assert result.stderr.startswith("usage: ./lc.sh run") and "manage" in result.stderr
        assert result.stdout == ""


# --- children die with the run command ----------------------------------------------------------


def test_children_die_with_their_parent_even_on_sigkill(tmp_path):
    """What the supervisor and the embedded Redis start gets SIGTERM when its parent dies by any signal."""
    script = textwrap.dedent(
        f"""
        import sys, time
        sys.path.insert(0, {str(REPO)!r})
        from llamacontroller_site.supervision import Supervisor
        from llamacontroller_site.embedded_redis import EmbeddedRedis
        child = Supervisor().start("sleep", ["sleep", "120"])
        server = EmbeddedRedis().start()
        print(child.pid, server.process.pid, flush=True)
        time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in parent.stdout.readline().split()]
        assert all(psutil.Process(pid).ppid() == parent.pid for pid in pids)
        parent.kill()
        parent.wait()
        wait_until(lambda: all(gone(pid) for pid in pids), 10, "the children to die with their parent")
    finally:
        parent.kill()
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_stopping_a_child_whose_leader_was_killed_ends_the_rest_of_its_group():
    """A worker killed with SIGKILL leaves its pool processes: the stop ends them too."""
    from llamacontroller_site.supervision import Supervisor

    supervisor = Supervisor()
    script = "import subprocess, sys, time; print(subprocess.Popen(['sleep', '120']).pid, flush=True); time.sleep(120)"
    leader = supervisor.children["worker"] = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    pool = int(leader.stdout.readline())
    leader.kill()
    leader.wait()
    assert not gone(pool)
    supervisor.stop("worker")
    wait_until(lambda: gone(pool), 10, "the rest of the group to end")


# --- the embedded Redis: kept port, restarted when killed ------------------------------------------


def test_embedded_redis_keeps_its_port_across_runs(tmp_path, capsys):
    first = first_run.start_embedded_redis(tmp_path)
    first.stop()
    assert (tmp_path / "embedded-redis.port").read_text().strip() == str(first.port)
    again = first_run.start_embedded_redis(tmp_path)
    try:
        assert again.port == first.port and again.url == first.url
    finally:
        again.stop()
    # Taken by somebody else meanwhile: another port, remembered from now on.
    with EmbeddedRedis(port=first.port):
        other = first_run.start_embedded_redis(tmp_path)
        other.stop()
    assert other.port != first.port
    assert (tmp_path / "embedded-redis.port").read_text().strip() == str(other.port)


def test_killed_embedded_redis_is_restarted_on_the_same_port_and_password(tmp_path, capsys):
    server = EmbeddedRedis(log_file=tmp_path / "redis.log").start()
    try:
        port, url = server.port, server.url
        restarts: list[float] = []
        assert supervision.keep_redis_up(server, restarts) and restarts == []
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        assert supervision.keep_redis_up(server, restarts)
        assert server.port == port and redis.Redis.from_url(url).ping()
        assert f"exited with code -9: restarting it on port {port}" in capsys.readouterr().out
        # One that keeps dying stops the run, saying so.
        for _ in range(supervision.REDIS_RESTARTS_PER_MINUTE - 1):
            server.process.kill()
            server.process.wait()
            supervision.keep_redis_up(server, restarts)
        server.process.kill()
        server.process.wait()
        assert not supervision.keep_redis_up(server, restarts)
        assert "times within a minute: stopping" in capsys.readouterr().out
    finally:
        server.stop()


# --- the CLI from a second terminal -----------------------------------------------------------------


def test_manage_py_without_secret_key_says_so_in_one_line(tmp_path):
    result = subprocess.run(
        [sys.executable, "manage.py", "ps"], cwd=REPO, env=clean_env(LLAMACONTROLLER_DATA_DIR=str(tmp_path)),
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode != 0
    assert result.stderr.count("\n") == 1, result.stderr
    assert "SECRET_KEY is not set" in result.stderr and "Traceback" not in result.stderr
    assert "./lc.sh manage COMMAND" in result.stderr  # what to do instead


def test_lc_manage_runs_with_the_run_commands_environment(tmp_path):
    """`./lc.sh manage` (the runner's `manage`): the run command's data folder and secret key, its embedded
    Redis's URL and its simulated GPUs, without setting anything by hand."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "embedded-redis.url").write_text("redis://:pw@127.0.0.1:6999/0")
    code = (
        "from django.conf import settings as s; print(s.DATA_DIR, s.REDIS_URL, s.GPU_BACKEND, s.SECRET_KEY)"
    )
    result = subprocess.run(
        [sys.executable, "-m", "llamacontroller_site.runner", "manage", "shell", "-c", code],
        cwd=REPO, env=clean_env(LLAMACONTROLLER_DATA_DIR=str(data)), capture_output=True, text=True, timeout=90,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    data_dir, redis_url, backend, key = result.stdout.splitlines()[-1].split()
    assert (data_dir, redis_url) == (str(data), "redis://:pw@127.0.0.1:6999/0")
    assert key == (data / "secret_key").read_text().strip()
    assert backend == ("fake" if (data / "fake-gpus.json").exists() else "auto")  # as the run command chose


# --- the way out: a dead llama-server, a dropped database connection -------------------------------


@pytest.fixture
def sleeper(tmp_path):
    """A copy of `sleep` named llama-server, started as the worker starts llama-server; killed at teardown."""
    path = tmp_path / "bin" / "llama-server"
    path.parent.mkdir()
    shutil.copy(shutil.which("sleep"), path)
    started = []

    def start(instance):
        log = launch.log_path_for(instance)
        pid, create_time = processes.launch([str(path), "120"], env=processes.scrubbed_env(), log_path=log)
        started.append(pid)
        GpuInstance.objects.filter(pk=instance.pk).update(
            pid=pid, process_create_time=create_time, log_path=str(log)
        )
        instance.refresh_from_db()
        return pid

    yield start
    for pid in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)


@pytest.mark.django_db(transaction=True)
def test_stopping_a_llama_server_that_died_records_a_crash(fake_gpus, tiny_model, sleeper):
    """Ctrl-C (the unload) after a llama-server was killed: `crashed` with its exit code, not `unloaded`."""
    instance = running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[:1])
    pid = sleeper(instance)
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: processes.exit_code_of(pid, instance.log_path) == -9, 10, "the exit code in the log")
    stop.unload_instance(instance.pk)
    instance.refresh_from_db()
    assert (instance.status, instance.exit_code) == (Status.CRASHED, -9)
    assert "exited unexpectedly with code -9" in instance.error
    assert not instance.events.filter(kind=InstanceEvent.Kind.UNLOADED).exists()
    assert instance.restart_count == 0  # not restarted: it was to stop anyway


def terminate_own_connection() -> None:
    """What an administrator's pg_terminate_backend (or a database restart) does to this process's
    connection: it is gone, and Django does not know yet."""
    import psycopg

    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_backend_pid()")
        pid = cursor.fetchone()[0]
    s = connection.settings_dict
    with psycopg.connect(
        dbname=s["NAME"], user=s["USER"], password=s["PASSWORD"] or None, host=s["HOST"] or "127.0.0.1",
        port=s["PORT"] or 5432, autocommit=True,
    ) as admin:  # fmt: skip
        admin.execute("SELECT pg_terminate_backend(%s)", [pid])
    time.sleep(0.2)


@pytest.fixture
def postgresql():
    if connection.vendor != "postgresql":
        pytest.skip("a dropped connection is PostgreSQL's (CI's second pass: DATABASE_URL=postgres://...)")


@pytest.mark.django_db(transaction=True)
def test_run_command_stops_its_models_after_its_connection_was_dropped(
    postgresql, fake_gpus, tiny_model, sleeper, settings
):
    instance = running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[:1])
    pid = sleeper(instance)
    terminate_own_connection()
    host_instances.stop_instances()
    instance.refresh_from_db()
    assert instance.status == Status.STOPPED
    assert not processes.is_alive(pid, instance.process_create_time)


@pytest.mark.django_db(transaction=True)
def test_unload_survives_a_connection_dropped_on_the_way(
    postgresql, fake_gpus, tiny_model, sleeper, monkeypatch
):
    """The connection drops while the process is being stopped: the unload goes on with a new one."""
    instance = running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[:1])
    pid = sleeper(instance)
    real_stop = stop.stop_pid

    dropped = []

    def stop_and_lose_the_connection(*args, **kwargs):
        problem = real_stop(*args, **kwargs)
        if not dropped:  # once
            terminate_own_connection()
            dropped.append(True)
        return problem

    monkeypatch.setattr(stop, "stop_pid", stop_and_lose_the_connection)
    stop.unload_instance(instance.pk)
    instance.refresh_from_db()
    assert instance.status == Status.STOPPED
    assert not processes.is_alive(pid, instance.process_create_time)
    assert instance.events.filter(kind=InstanceEvent.Kind.UNLOADED).count() == 1
