"""The load form's memory prediction (htmx, on every change of the form)."""

from django.shortcuts import render
from django.views.decorators.http import require_GET

from accounts import roles
from accounts.decorators import role_required
from gpus.models import Host
from models_app import checks, estimates, model_files, placement
from models_app.errors import Refused
from models_app.models import ModelConfig

from .actions import parse_gpu_choice


@require_GET
@role_required(roles.can_load)
def load_estimate(request):
    """The load form's prediction for the chosen model and GPUs (htmx, on every change): "≈ 6.1 GiB on
    GPU 0: fits, 74.0 GiB free". With no GPU chosen: the placement's suggestion, which the form preselects."""
    context = {"multi_host": Host.objects.count() > 1}
    model = ModelConfig.objects.filter(pk=request.GET.get("model_id", "")).first()
    if model is None:
        return render(request, "partials/load_estimate.html", {**context, "error": "Choose a model."})
    # "Let the controller choose": among the live hosts that have the model file (or have not said).
    offered, missing = model_files.hosts_for(model)
    chosen_host = next((h for h in offered if h.name == request.GET.get("host")), None)
    context.update(offered_hosts=offered, missing_hosts=missing, chosen_host=chosen_host)
    try:
        host_name, gpu_spec = parse_gpu_choice(request.GET.getlist("gpu"))
        if gpu_spec:
            host, gpus = checks.resolve_gpus(checks.parse_gpu_spec(gpu_spec), host_name)
            context["file_problem"] = model_files.refusal(model, host)
            prediction = estimates.predict(model, gpus)
        else:
            choices, _ = placement.rank(model, host=chosen_host)
            fitting = [c for c in choices if c.fits]
            prediction = fitting[0].prediction if fitting else None
            context.update(suggested=True, ranking=fitting)
            if fitting:
                context["suggestion"] = ",".join(f"{g.host.name}:{g.index}" for g in fitting[0].gpus)
    except ValueError as exc:
        return render(request, "partials/load_estimate.html", {**context, "error": str(exc)})
    except Refused as exc:
        return render(request, "partials/load_estimate.html", {**context, "error": exc.message})
    if prediction is not None and prediction.estimate is not None:
        breakdown = prediction.estimate.as_dict()
        for gpu, part in zip(prediction.gpus, breakdown["gpus"], strict=False):
            part["gpu_index"] = gpu.index
        context["breakdown"] = breakdown
    context["prediction"] = prediction
    return render(request, "partials/load_estimate.html", context)
