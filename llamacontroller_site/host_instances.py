"""This host's model instances as the run command sees them: whether its worker holds the host name, and
stopping the instances when the whole product stops (llamacontroller_site/runner.py and its watchdog). Every
database read survives one dropped connection. Django is imported inside the functions: the run command
imports this module before it has set Django up (llamacontroller_site/first_run.py migrate())."""

from llamacontroller_site.supervision import say


def host_name_holder() -> str | None:
    """Who holds this host's name, when a live worker other than one of this run does. Read-only: the claim
    itself is the worker's (models_app/cluster.py)."""
    from django.conf import settings

    from gpus.models import Host
    from models_app import cluster

    host = Host.objects.filter(name=settings.HOST_NAME).first()
    return cluster._held_by_other(host, cluster.this_worker()) if host else None


def retrying(action):
    """A database action that survives a dropped connection (a database restart, pg_terminate_backend):
    the broken connection is closed and the action tried once more on a new one."""
    from django.db import InterfaceError, OperationalError, connections

    try:
        return action()
    except (OperationalError, InterfaceError):
        connections.close_all()
        return action()


def worker_claimed(worker_pid: int) -> bool:
    """Whether this run's worker holds the host name (or held it until it died): only then are the host's
    instances this run's to stop."""
    from django.conf import settings

    from gpus.models import Host
    from models_app import cluster

    mine = Host.objects.filter(
        name=settings.HOST_NAME, worker_pid=worker_pid, worker_machine_id=cluster.machine_id()
    )
    return retrying(mine.exists)


def stop_instances() -> None:
    """The product stops as a whole: unload this host's models. Their processes outlive a worker by design,
    so that a worker restart does not kill them; a Ctrl-C of the whole product should."""
    from django.conf import settings
    from django.db import connections

    from models_app.models import GpuInstance
    from models_app.stop import unload_instance

    # This process's connection has been idle since the start, and may have been dropped meanwhile.
    connections.close_all()
    mine = GpuInstance.objects.filter(host__name=settings.HOST_NAME, status__in=GpuInstance.ACTIVE_STATUSES)
    for instance_id in retrying(lambda: list(mine.values_list("id", flat=True))):
        unload_instance(instance_id)  # survives a dropped connection itself
        status = retrying(GpuInstance.objects.filter(pk=instance_id).values_list("status", flat=True).first)
        say(f"instance {instance_id}: {status}")
