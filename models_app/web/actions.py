"""The dashboard's actions: load, unload, switch, kill an orphan (POST, admitted by role; the services decide).
htmx posts get the refreshed cards with the outcome on top, plain form posts a redirect and a message."""

from django.contrib import messages
from django.shortcuts import get_object_or_404, redirect
from django.views.decorators.http import require_POST

from accounts import roles
from accounts.decorators import role_required
from gpus.models import Gpu
from models_app import services
from models_app.api.views import instance_queryset
from models_app.errors import Refused

from .dashboard import render_partial


def _after_action(request, text: str, status: int = 200):
    """htmx: the refreshed cards with the message on top. Plain form posts: back to the dashboard."""
    level = "success" if status < 400 else "error"
    if request.htmx:
        return render_partial(request, flash={"level": level, "text": text}, status=status)
    messages.add_message(request, messages.SUCCESS if status < 400 else messages.ERROR, text)
    return redirect("dashboard")


def _attempt(request, command, done):
    """Runs a service command: its refusal (words and status), or `done(result)`'s words on success."""
    try:
        result = command()
    except Refused as exc:
        return _after_action(request, exc.message, exc.status)
    return _after_action(request, done(result))


def parse_gpu_choice(values: list[str]) -> tuple[str | None, str]:
    """The toggles send "<host>:<index>"; the service wants one host and "0,1"."""
    hosts, indexes = set(), []
    for value in values:
        host, _, index = value.rpartition(":")
        hosts.add(host)
        indexes.append(index)
    if len(hosts) > 1:
        raise ValueError("The chosen GPUs are on different hosts; one instance runs on one host.")
    return (hosts.pop() if hosts else None), ",".join(indexes)


@require_POST
@role_required(roles.can_load)
def load(request):
    model_id = request.POST.get("model_id", "")
    force = bool(request.POST.get("force"))
    evict = bool(request.POST.get("evict"))
    if request.POST.get("auto"):  # "let the controller choose": host (unless one is picked) and GPUs
        host_name = request.POST.get("host") or None
        return _attempt(
            request,
            lambda: services.request_load_auto(
                model_id=model_id, actor=request.user, host_name=host_name, force=force, evict=evict
            ),
            lambda new: f"Loading {model_id} on {new.host.name} GPU {new.gpu_ids} (instance #{new.pk}).",
        )
    try:
        host_name, gpu_spec = parse_gpu_choice(request.POST.getlist("gpu"))
    except ValueError as exc:
        return _after_action(request, str(exc), 400)
    if not gpu_spec:
        return _after_action(request, "Choose at least one GPU, or let the controller choose.", 400)
    return _attempt(
        request,
        lambda: services.request_load(
            model_id=model_id,
            gpu_spec=gpu_spec,
            actor=request.user,
            host_name=host_name,
            force=force,
            evict=evict,
        ),
        lambda new: f"Loading {model_id} on GPU {new.gpu_ids} (instance #{new.pk}).",
    )


def _managed_instance(request, pk: int, verb: str):
    """The instance, and the answer refusing it when it is not the user's to manage (else None)."""
    instance = get_object_or_404(instance_queryset(), pk=pk)
    if not roles.can_manage_instance(request.user, instance):
        return instance, _after_action(request, f"You may {verb} only your own instances.", 403)
    return instance, None


@require_POST
@role_required(roles.can_load)
def unload(request, pk: int):
    instance, refusal = _managed_instance(request, pk, "unload")
    return refusal or _attempt(
        request,
        lambda: services.request_unload(instance=instance, actor=request.user),
        lambda _: f"Unloading {instance.model_id} from GPU {instance.gpu_ids}.",
    )


@require_POST
@role_required(roles.can_load)
def switch(request, pk: int):
    instance, refusal = _managed_instance(request, pk, "switch")
    model_id = request.POST.get("model_id", "")
    return refusal or _attempt(
        request,
        lambda: services.request_switch(
            model_id=model_id,
            gpu_spec=instance.gpu_ids,
            actor=request.user,
            host_name=instance.host.name,
            force=bool(request.POST.get("force")),
        ),  # fmt: skip
        lambda new: f"Switching GPU {instance.gpu_ids} to {model_id} (instance #{new.pk}).",
    )


@require_POST
@role_required(roles.can_administer)
def kill_orphan(request, gpu_pk: int, pid: int):
    gpu = get_object_or_404(Gpu.objects.select_related("host"), pk=gpu_pk)
    return _attempt(
        request,
        lambda: services.kill_orphan(gpu=gpu, pid=pid, actor=request.user),
        lambda _: f"Killing orphan process {pid} on {gpu.host.name} GPU {gpu.index}.",
    )
