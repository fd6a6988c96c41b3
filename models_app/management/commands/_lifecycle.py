"""What the load/unload/switch/ps commands share: acting as a user or the system, waiting, reporting."""

import time

from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.management.base import CommandError

from models_app.errors import Refused
from models_app.models import GpuInstance


def add_common_arguments(parser, *, gpu_required: bool = True) -> None:
    parser.add_argument("--gpu", required=gpu_required, help='GPU indices on one host: "0" or "0,1".')
    parser.add_argument("--host", help="Host name (needed only when several hosts have these GPU indices).")
    parser.add_argument("--user", help="Act as this user, with that user's role; default: the system.")
    parser.add_argument("--wait", action="store_true", help="Wait until the work is done, and report it.")


def actor_from(username: str | None):
    if not username:
        return None
    user = get_user_model().objects.filter(username=username).first()
    if user is None:
        raise CommandError(f"unknown user {username!r}")
    return user


def refused(exc: Refused) -> CommandError:
    where = f" ({exc.field})" if exc.field else ""
    return CommandError(f"{exc.message}{where}")


def wait_for(instance: GpuInstance, until: tuple[str, ...], timeout: float | None = None) -> GpuInstance:
    """Poll the database until the instance reaches one of `until` (or any inactive status)."""
    timeout = timeout or settings.LOAD_TIMEOUT + settings.STOP_TIMEOUT + 30
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        instance.refresh_from_db()
        if instance.status in until or not instance.is_active:
            return instance
        time.sleep(0.1)
    raise CommandError(f"instance #{instance.pk} still {instance.status} after {timeout:.0f}s")


def describe(instance: GpuInstance) -> str:
    where = f"{instance.host.name} GPU {instance.gpu_ids}"
    text = f"#{instance.pk} {instance.model_id} on {where}: {instance.status}"
    if instance.status == GpuInstance.Status.RUNNING:
        text += f" on port {instance.port}"
    if instance.error:
        text += f"\n{instance.error}"
    return text


def add_force_argument(parser) -> None:
    parser.add_argument(
        "--force", action="store_true", help="Load even onto GPUs that other processes occupy (recorded)."
    )


def request_and_report(
    command, request, *, model: str, gpu: str, host: str | None, user: str | None, wait: bool,
    force: bool = False, **options,
):  # fmt: skip
    """load and switch: call the service, then report the request or, with --wait, the outcome. `options`:
    further keywords of the service (load's evict)."""
    try:
        instance = request(
            model_id=model, gpu_spec=gpu, actor=actor_from(user), host_name=host, force=force, **options
        )
    except Refused as exc:
        raise refused(exc) from None
    if not wait:
        command.stdout.write(f"requested: {describe(instance)}")
        return
    instance = wait_for(instance, (GpuInstance.Status.RUNNING,))
    if instance.status != GpuInstance.Status.RUNNING:
        raise CommandError(describe(instance))
    command.stdout.write(describe(instance))
