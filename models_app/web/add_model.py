"""Add a model without the admin (admins only). The GGUF files in this web node's model folders
(LLAMACONTROLLER_MODEL_DIRS) are listed with their size, architecture, quantisation and the predicted memory on
each GPU of the live hosts. Workers report whether a registered model's file is on their host, not which files
they find, so the list is the web node's own folders; in a cluster each host needs the file at the same path,
which its worker checks once the model is registered (models_app/model_files.py). Registering takes an id, a
name and flags through the registry's form (models_app/forms.py: the same checks as the admin, the API and the
YAML import); the dashboard's load form then offers the model."""

from dataclasses import dataclass, field
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import reverse

from accounts import roles
from accounts.decorators import role_required
from gpus.models import Gpu, Host
from models_app import estimates
from models_app.formatting import format_mib
from models_app.forms import ModelConfigForm
from models_app.models import ModelConfig
from models_app.registry import read_gguf_facts

MAX_FILES = 200  # a folder of thousands of files is listed in part, and says so
MAX_GPUS = 8  # the estimate on the first GPUs of the live hosts (they are usually alike)


class RegisterForm(ModelConfigForm):
    class Meta(ModelConfigForm.Meta):
        fields = ["id", "name", "path", "cli_params"]
        help_texts = {"cli_params": 'llama-server flags without dashes, as JSON: {"c": 4096, "ngl": 99}'}


@dataclass
class FoundFile:
    """A GGUF file in a model folder, as the page lists it."""

    path: Path
    size: str
    architecture: str
    quantisation: str
    parameters: str
    registered_as: str | None
    estimates: list[str] = field(default_factory=list)


def quantisation(file_type) -> str:
    """GGUF general.file_type as llama.cpp names it (Q4_K_M, F16); the number itself when unknown."""
    from gguf import LlamaFileType  # numpy comes with it: loaded when this admin page is first opened

    try:
        return LlamaFileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (ValueError, TypeError):
        return "" if file_type is None else str(file_type)


def gguf_files() -> tuple[list[Path], bool]:
    """The .gguf files under the model folders, sorted, at most MAX_FILES; and whether there were more."""
    found = []
    for folder in settings.MODEL_DIRS:
        root = Path(folder)
        if root.is_dir():
            found += sorted(p for p in root.rglob("*.gguf") if p.is_file())
    return found[:MAX_FILES], len(found) > MAX_FILES


def describe(path: Path, registered: dict[str, str], gpus: list[Gpu]) -> FoundFile:
    facts = read_gguf_facts(path)
    count = facts.get("parameter_count")
    found = FoundFile(
        path=path,
        size=format_mib(path.stat().st_size / 2**20),
        architecture=facts.get("architecture", "?"),
        quantisation=quantisation(facts.get("file_type")),
        parameters=(f"{count / 1e9:.2f} B" if count >= 1e8 else f"{count / 1e6:.2f} M") if count else "?",
        registered_as=registered.get(str(path)),
    )
    probe = ModelConfig(id="", name=path.stem, path=str(path), cli_params={})  # unsaved: the file's defaults
    for gpu in gpus:
        try:
            prediction = estimates.predict(probe, [gpu])
        except Exception as exc:  # noqa: BLE001 - a file the estimator cannot read says so, the page stays
            found.estimates.append(f"GPU {gpu.index}: no estimate ({exc})")
            continue
        where = f"{gpu.host.name} " if len({g.host_id for g in gpus}) > 1 else ""
        found.estimates.append(f"{where}{prediction.summary()}")
    return found


@role_required(roles.can_administer)
def model_files(request):
    """GET: the files and the form; POST: register one (then back to the dashboard, where it can be loaded)."""
    form = RegisterForm(request.POST or None, initial={"cli_params": {}})
    if request.method == "POST" and form.is_valid():
        model = form.save()
        messages.success(request, f"Registered {model.name} ({model.pk}); load it below.")
        return redirect(reverse("dashboard") + "#load-heading")
    files, truncated = gguf_files()
    registered = dict(ModelConfig.objects.values_list("path", "id"))
    gpus = list(
        Gpu.objects.filter(host__in=Host.objects.up(), index__isnull=False)
        .select_related("host")
        .order_by("host__name", "index")[:MAX_GPUS]
    )
    context = {
        "files": [describe(p, registered, gpus) for p in files],
        "truncated": truncated,
        "folders": settings.MODEL_DIRS,
        "form": form,
        "chosen": request.POST.get("path") or request.GET.get("path", ""),
    }
    return render(request, "add_model.html", context, status=400 if form.errors else 200)
