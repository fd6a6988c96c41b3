"""Add a model without the admin (admins only). Each host's worker reports the GGUF files it finds in its own
model folders (its LLAMACONTROLLER_MODEL_DIRS; models_app/folder_scan.py): the page lists them per host, with
their size, architecture, quantisation and the predicted memory on each GPU of that host, marks those already
registered, and registers one for that host's path. A host that is down shows its last-known list, marked
stale. `./lc.sh run` is a cluster of one: its embedded worker is the one host.

Opening the page asks each live host whose list is older than FRESH_SECONDS for a new scan, and the list polls
(htmx) until the scans land, so a file just copied into a folder appears on reload; Rescan asks every live host
at once. Registering takes an id, a name and flags through the registry's form (models_app/forms.py: the same
checks as the admin, the API and the YAML import; the path and facts as the host's worker reported them,
models_app/registry.reported_model_file); the dashboard's load form then offers the model."""

from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from django import forms
from django.conf import settings
from django.contrib import messages
from django.shortcuts import redirect, render
from django.urls import reverse
from django.utils import timezone

from accounts import roles
from accounts.decorators import role_required
from gpus.models import Gpu, Host
from models_app import dispatch, estimates, estimator, folder_scan
from models_app.formatting import format_mib, format_time
from models_app.forms import ModelConfigForm
from models_app.models import HostFolderScan, HostGgufFile, ModelConfig
from models_app.registry import RegistryError, reported_model_file

MAX_FILES = 200  # per host: a folder of thousands of files is listed in part, and says so
MAX_GPUS = 8  # the estimate on the first GPUs of each host (a host's GPUs are usually alike)
FRESH_SECONDS = 10  # opening the page asks a host for a new scan when its list is older than this
ANSWER_SECONDS = 30  # the page polls this long for a scan it asked for


class RegisterForm(ModelConfigForm):
    """The registry's form, for a file that a host's worker reported (`host`); without a host, a path that
    the web node reads itself (as before hosts reported their files)."""

    host = forms.ChoiceField(required=False, label="Host", help_text="The host whose worker found the file.")
    field_order = ["id", "name", "host", "path", "cli_params"]

    class Meta(ModelConfigForm.Meta):
        fields = ["id", "name", "path", "cli_params"]
        help_texts = {"cli_params": 'llama-server flags without dashes, as JSON: {"c": 4096, "ngl": 99}'}

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        names = HostGgufFile.objects.order_by("host__name").values_list("host__name", flat=True).distinct()
        self.fields["host"].choices = [("", "—")] + [(name, name) for name in names]

    def clean_path(self):
        host = self.data.get("host") or ""
        if not host:
            return super().clean_path()
        raw = self.cleaned_data["path"]
        row = HostGgufFile.objects.filter(host__name=host, path=raw).first()
        if row is None:
            raise forms.ValidationError(f"host {host} did not report a GGUF file at {raw} (Rescan?)")
        if row.error:
            raise forms.ValidationError(f"{raw} cannot be read on host {host}: {row.error}")
        try:
            self.file_values = reported_model_file(raw, row.facts, row.size_bytes)
        except RegistryError as exc:
            raise forms.ValidationError(str(exc)) from None
        return self.file_values["path"]


@dataclass
class FoundFile:
    """A GGUF file that a host reported, as the page lists it."""

    path: Path
    size: str
    architecture: str
    quantisation: str
    parameters: str
    registered_as: str | None
    error: str = ""
    estimates: list[str] = field(default_factory=list)


@dataclass
class HostFiles:
    """One host's list: its state, its last scan and its files."""

    host: Host
    up: bool
    scan: HostFolderScan | None
    files: list[FoundFile]
    truncated: bool

    @property
    def waiting(self) -> bool:
        """A scan was asked for recently and has not landed: the list polls."""
        scan = self.scan
        recent = (
            scan is not None
            and scan.requested_at
            and scan.requested_at >= timezone.now() - timedelta(seconds=ANSWER_SECONDS)
        )
        return bool(self.up and recent and scan.pending)

    def status(self) -> str:
        scan = self.scan
        if not self.up:
            return f"down: last-known list ({self.host.down_reason()})"
        if scan is None or scan.scanned_at is None:
            return "no list yet: waiting for its worker's first scan"
        text = f"scanned {format_time(scan.scanned_at)} in {scan.duration_ms or 0:.0f} ms"
        if self.waiting:
            text += " · scanning again…"
        elif scan.pending:
            text += f" · asked at {format_time(scan.requested_at)}, no answer yet"
        return text


def parameters(count) -> str:
    if not count:
        return "?"
    return f"{count / 1e9:.2f} B" if count >= 1e8 else f"{count / 1e6:.2f} M"


def describe(row: HostGgufFile, registered: dict[str, str], gpus: list[Gpu], binary=None) -> FoundFile:
    found = FoundFile(
        path=Path(row.path),
        size=format_mib(row.size_bytes / 2**20),
        architecture=row.architecture or "?",
        quantisation=row.quantization,
        parameters=parameters(row.parameter_count),
        registered_as=registered.get(row.path),
        error=row.error,
    )
    if row.error or not gpus:
        return found
    # Unsaved, with the file's defaults and the host's default llama-server (read once per host)
    probe = ModelConfig(id="", name=found.path.stem, path=row.path, cli_params={}, binary=binary)
    try:
        facts = estimator.from_summary(row.path, row.header)
    except estimator.EstimateError as exc:
        found.estimates.append(f"no estimate ({exc})")
        return found
    for gpu in gpus:
        try:
            prediction = estimates.predict(probe, [gpu], facts=facts)
        except Exception as exc:  # noqa: BLE001 - a header the estimator cannot use says so, the page stays
            found.estimates.append(f"GPU {gpu.index}: no estimate ({exc})")
            continue
        found.estimates.append(prediction.summary())
    return found


def host_lists() -> list[HostFiles]:
    """Every live host, and every host that is down but reported files (stale), by name."""
    live = set(Host.objects.up().values_list("pk", flat=True))
    reported = set(HostGgufFile.objects.values_list("host_id", flat=True).distinct())
    hosts = Host.objects.filter(pk__in=live | reported).order_by("name")
    scans = {s.host_id: s for s in HostFolderScan.objects.filter(host__in=hosts)}
    registered = dict(ModelConfig.objects.values_list("path", "id"))
    lists = []
    for host in hosts:
        up = host.pk in live
        gpus = list(host.gpus.filter(index__isnull=False).order_by("index")[:MAX_GPUS]) if up else []
        for gpu in gpus:
            gpu.host = host
        binary = estimates.binary_for(ModelConfig(), host) if gpus else None
        rows = list(HostGgufFile.objects.filter(host=host).order_by("path")[: MAX_FILES + 1])
        files = [describe(row, registered, gpus, binary) for row in rows[:MAX_FILES]]
        lists.append(HostFiles(host, up, scans.get(host.pk), files, len(rows) > MAX_FILES))
    return lists


def ask_for_scans(hosts: list[Host], *, older_than: float | None = None) -> list[str]:
    """Send a scan to each of `hosts` (those whose list is older than `older_than` seconds and that were not
    asked as recently): the names the broker refused."""
    if older_than is not None:
        since = timezone.now() - timedelta(seconds=older_than)
        fresh = HostFolderScan.objects.filter(host__in=hosts).filter(scanned_at__gte=since)
        asked = HostFolderScan.objects.filter(host__in=hosts, requested_at__gte=since)
        skip = set(fresh.values_list("host_id", flat=True)) | set(asked.values_list("host_id", flat=True))
        hosts = [h for h in hosts if h.pk not in skip]
    if not hosts:
        return []
    folder_scan.mark_requested(hosts)
    return dispatch.send_folder_scans(hosts, expires=ANSWER_SECONDS)


@role_required(roles.can_administer)
def model_files(request):
    """GET: the files per host and the form (`?list=1`: the list alone, for the poll); POST: register one (then
    back to the dashboard, where it can be loaded), or `rescan`: ask every live host for a scan now."""
    if request.method == "POST" and "rescan" in request.POST:
        live = list(Host.objects.up())
        refused = ask_for_scans(live)
        if refused:
            messages.error(request, f"Could not reach the queue of {', '.join(refused)}: is the broker up?")
        else:
            messages.info(request, f"Asked {len(live)} host{'s' if len(live) != 1 else ''} to scan again.")
        return redirect("model-files")
    initial = {"cli_params": {}, "host": request.GET.get("host", "")}
    form = RegisterForm(request.POST or None, initial=initial)
    if request.method == "POST" and form.is_valid():
        model = form.save()
        messages.success(request, f"Registered {model.name} ({model.pk}); load it below.")
        return redirect(reverse("dashboard") + "#load-heading")
    if request.method == "GET" and "list" not in request.GET:
        ask_for_scans(list(Host.objects.up()), older_than=FRESH_SECONDS)
    lists = host_lists()
    context = {
        "hosts": lists,
        "waiting": any(h.waiting for h in lists),
        "folders": settings.MODEL_DIRS,
        "form": form,
        "chosen": request.POST.get("path") or request.GET.get("path", ""),
    }
    if "list" in request.GET:
        return render(request, "add_model_files.html", context)
    return render(request, "add_model.html", context, status=400 if form.errors else 200)
