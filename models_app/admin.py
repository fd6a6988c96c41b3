from datetime import UTC, datetime

from django import forms
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.db import transaction
from django.shortcuts import redirect
from django.template.response import TemplateResponse
from django.utils.html import format_html

from accounts import roles
from gpus.admin import GpuAdmin, readable_json
from gpus.models import Gpu
from models_app.formatting import format_mib, format_time

from . import services
from .errors import Refused
from .events import record
from .forms import ModelConfigForm
from .models import GpuInstance, HostModelFile, InstanceEvent, InstanceGpu, LlamaBinary, ModelConfig


@admin.register(LlamaBinary)
class LlamaBinaryAdmin(admin.ModelAdmin):
    """Read-only: workers discover and verify binaries from their own configuration; nobody types a path."""

    list_display = ["name", "host", "version", "is_default", "error", "discovered_at"]
    list_filter = ["host", "is_default"]
    search_fields = ["name", "path", "version"]
    list_select_related = ["host"]
    exclude = ["catalogue"]
    readonly_fields = ["flag_count"]

    @admin.display(description="flags in its catalogue")
    def flag_count(self, binary) -> int:
        return len(binary.catalogue.get("options", []))

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class HostModelFileInline(admin.TabularInline):
    """What each host's worker reported about the model file: written by the workers, never typed in."""

    model = HostModelFile
    fields = ["host", "available", "reason", "size_bytes", "checked_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    verbose_name_plural = "model file on each host (reported by its worker)"

    def get_queryset(self, request):
        return super().get_queryset(request).select_related("host")

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False


@admin.register(ModelConfig)
class ModelConfigAdmin(admin.ModelAdmin):
    form = ModelConfigForm
    list_display = ["id", "name", "path", "binary", "on_demand", "keep_alive_seconds", "updated_at"]
    list_filter = ["on_demand", "allow_anonymous", "exclusive", "restart_on_crash", "binary"]
    search_fields = ["id", "name", "path"]
    readonly_fields = ["gguf_header", "file_size", "created_at", "updated_at"]

    @admin.display(description="GGUF header")
    def gguf_header(self, model) -> str:
        return readable_json(model.gguf_metadata)

    @admin.display(description="File size")
    def file_size(self, model) -> str:
        size = model.file_size_bytes
        return "—" if size is None else f"{format_mib(size / 2**20)} ({size} bytes)"

    def get_inlines(self, request, obj):
        # A new entry has no reports yet (and its add form then needs no inline management data).
        return [HostModelFileInline] if obj is not None else []


class InstanceGpuInline(admin.TabularInline):
    model = InstanceGpu
    fields = ["position", "gpu", "active"]
    readonly_fields = fields
    extra = 0
    can_delete = False

    def has_add_permission(self, request, obj=None):
        return False


class InstanceEventInline(admin.TabularInline):
    model = InstanceEvent
    fields = ["created_at", "kind", "actor_name", "detail"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    ordering = ["-created_at"]

    def has_add_permission(self, request, obj=None):
        return False


class LoadForm(forms.Form):
    model = forms.ModelChoiceField(queryset=ModelConfig.objects.all())
    gpu_id = forms.CharField(label="GPUs", help_text='GPU indices on one host: "0" or "0,1".')
    host = forms.CharField(required=False, help_text="Only needed when several hosts have these indices.")
    force = forms.BooleanField(required=False, help_text="Load even onto GPUs that other processes occupy.")


@admin.register(GpuInstance)
class GpuInstanceAdmin(admin.ModelAdmin):
    list_display = [
        "id", "model", "host", "gpu_ids", "status", "port", "pid", "memory_used_mb", "memory_total_mb",
        "memory_source", "memory_estimated_mb", "memory_estimate_error_pct", "owner", "requested_at",
    ]  # fmt: skip
    list_filter = ["status", "memory_source", "host", "model"]
    search_fields = ["model__id", "model__name", "owner__username", "gpu_ids"]
    list_select_related = ["model", "host", "owner"]
    raw_id_fields = ["owner"]
    inlines = [InstanceGpuInline, InstanceEventInline]
    # The instance's API key is for the controller only: never shown.
    exclude = ["api_key", "memory_estimate", "process_create_time"]
    # Raw values people cannot read (a JSON breakdown, a Unix timestamp) are shown through the methods below.
    readonly_fields = [
        {"memory_estimate": "estimate", "process_create_time": "process_started"}.get(f.name, f.name)
        for f in GpuInstance._meta.fields
        if f.name != "api_key"
    ]
    actions = ["unload_selected"]

    @admin.display(description="Memory estimate")
    def estimate(self, instance) -> str:
        """The prediction made at load time: its total per GPU in words, then the whole breakdown, indented."""
        parts = (instance.memory_estimate or {}).get("gpus") or []
        totals = ", ".join(f"GPU {n}: {format_mib(p.get('total_mib'))}" for n, p in enumerate(parts))
        return format_html("{}{}", totals, readable_json(instance.memory_estimate))

    @admin.display(description="Process started")
    def process_started(self, instance) -> str:
        """When the llama-server process started (psutil's create time, which identifies it with its pid)."""
        if instance.process_create_time is None:
            return "—"
        moment = datetime.fromtimestamp(instance.process_create_time, tz=UTC)
        return f"{format_time(moment, with_date=True)} ({instance.process_create_time})"

    def add_view(self, request, form_url="", extra_context=None):
        """ "Add" loads a model: the same validation, queue and audit as the dashboard, never a raw row."""
        form = LoadForm(request.POST or None)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            try:
                instance = services.request_load(
                    model_id=data["model"].pk,
                    gpu_spec=data["gpu_id"],
                    actor=request.user,
                    host_name=data["host"] or None,
                    force=data["force"],
                )
            except Refused as exc:
                field = {"model_id": "model"}.get(exc.field, exc.field)
                form.add_error(field if field in form.fields else None, exc.message)
            else:
                self.message_user(request, f"Loading {instance}.", messages.SUCCESS)
                return redirect("admin:models_app_gpuinstance_change", instance.pk)
        context = {
            **self.admin_site.each_context(request),
            "title": "Load a model",
            "form": form,
            "opts": self.model._meta,
            **(extra_context or {}),
        }
        return TemplateResponse(request, "admin/models_app/gpuinstance/load.html", context)

    @admin.action(description="Unload selected instances")
    def unload_selected(self, request, queryset):
        done, refused = [], []
        for instance in queryset.select_related("host", "owner"):
            if not instance.is_active:
                continue
            try:
                services.request_unload(instance=instance, actor=request.user)
                done.append(f"#{instance.pk}")
            except Refused as exc:
                refused.append(f"#{instance.pk}: {exc.message}")
        if done:
            self.message_user(request, f"Unload requested for {', '.join(done)}.", messages.SUCCESS)
        for problem in refused:
            self.message_user(request, problem, messages.ERROR)
        if not done and not refused:
            self.message_user(request, "None of the selected instances is loaded.", messages.WARNING)

    # --- deleting: finished instances only, by admins, as an event; the audit trail stays whole ------

    def has_delete_permission(self, request, obj=None):
        # A loaded (or loading, or stopping) instance is unloaded, not deleted: use the unload action.
        return roles.can_administer(request.user) and (obj is None or not obj.is_active)

    def get_deleted_objects(self, objs, request):
        """The confirmation page: the instances and their GPU links go; their events stay (unlinked, see
        delete_model), so they are not listed, and the events' own no-delete rule does not block this."""
        listed, active = [], []
        for instance in objs:
            (active if instance.is_active else listed).append(instance)
        deleted = [
            f"GPU instance: {i} (its {i.events.count()} event(s) are kept in the audit trail)" for i in listed
        ]
        perms_needed = {f"active GPU instance {i} (unload it first)" for i in active}
        return deleted, {"GPU instances": len(listed)}, perms_needed, []

    def delete_model(self, request, obj):
        self._delete_finished(request, obj)

    def delete_queryset(self, request, queryset):
        for instance in queryset:
            self._delete_finished(request, instance)

    def _delete_finished(self, request, instance):
        """Delete one finished instance. Its events stay (InstanceEvent.instance is SET_NULL in the database
        too); one INSTANCE_DELETED event records who deleted what, naming the kept events and copying the
        timeline so it can still be read as one."""
        with transaction.atomic():
            instance = GpuInstance.objects.select_for_update().select_related("host").get(pk=instance.pk)
            if instance.is_active:
                raise PermissionDenied(f"instance #{instance.pk} is {instance.status}: unload it first")
            events = list(instance.events.order_by("created_at", "id"))
            timeline = "; ".join(
                f"#{e.id} {e.created_at:%Y-%m-%d %H:%M:%S} {e.kind} by {e.actor_name}" for e in events[:50]
            ) + (f"; … {len(events) - 50} more" if len(events) > 50 else "")
            record(
                InstanceEvent.Kind.INSTANCE_DELETED,
                actor=request.user,
                detail=(
                    f"instance #{instance.pk} ({instance.model_id} on {instance.host.name}:{instance.gpu_ids}, "
                    f"{instance.status}, owner {instance.owner or 'none'}) deleted; "
                    f"its {len(events)} event(s) are kept, unlinked: {timeline or 'none'}"
                ),
            )
            instance.delete()


@admin.register(InstanceEvent)
class InstanceEventAdmin(admin.ModelAdmin):
    """Read-only and append-only: no add, no change, no delete."""

    list_display = ["created_at", "kind", "actor_name", "instance", "detail"]
    list_filter = ["kind"]
    search_fields = ["actor_name", "detail"]
    list_select_related = ["instance__model", "instance__host"]
    raw_id_fields = ["instance", "actor"]
    show_full_result_count = False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        # The audit trail is append-only: nobody deletes an event, not even an admin.
        return False


class GpuWithOrphanKillAdmin(GpuAdmin):
    """The GPU admin plus the lifecycle's orphan kill. Registered from here because `gpus` does not know
    about llama-server instances (dependencies point one way: models_app -> gpus)."""

    list_display = [*GpuAdmin.list_display, "orphan_pids"]
    actions = ["kill_orphans"]

    @admin.display(description="Orphan llama-server PIDs")
    def orphan_pids(self, gpu) -> str:
        return ", ".join(str(p["pid"]) for p in gpu.processes if p.get("owner") == "orphan") or "-"

    @admin.action(description="Kill orphan llama-server processes on the selected GPUs")
    def kill_orphans(self, request, queryset):
        asked = 0
        for gpu in queryset.select_related("host"):
            for process in gpu.processes:
                if process.get("owner") != "orphan" or not process.get("pid"):
                    continue
                try:
                    services.kill_orphan(gpu=gpu, pid=process["pid"], actor=request.user)
                    asked += 1
                except Refused as exc:
                    self.message_user(request, f"PID {process['pid']}: {exc.message}", messages.ERROR)
        if asked:
            self.message_user(request, f"Kill requested for {asked} orphan process(es).", messages.SUCCESS)
        else:
            self.message_user(request, "No orphan processes on the selected GPUs.", messages.WARNING)


admin.site.unregister(Gpu)
admin.site.register(Gpu, GpuWithOrphanKillAdmin)
