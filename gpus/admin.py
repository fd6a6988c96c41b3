import json

from django.contrib import admin
from django.utils.html import format_html

from . import alerts
from .models import Alert, AlertRule, Gpu, Host, MemorySample


def readable_json(value) -> str:
    """A JSON field as people read it in the admin: indented, one key a line (not one line of raw JSON)."""
    if value in (None, {}, []):
        return "—"
    return format_html('<pre class="readable-json">{}</pre>', json.dumps(value, indent=2, sort_keys=True))


class ReadOnlyAdmin(admin.ModelAdmin):
    """Telemetry is written by workers only."""

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


class GpuInline(admin.TabularInline):
    model = Gpu
    fields = ["index", "uuid", "name", "state", "memory_used_mib", "memory_total_mib", "updated_at"]
    readonly_fields = fields
    extra = 0
    can_delete = False
    show_change_link = True


@admin.register(Host)
class HostAdmin(ReadOnlyAdmin):
    list_display = ["name", "telemetry_backend", "last_seen", "telemetry_error", "llama_server"]
    search_fields = ["name"]
    inlines = [GpuInline]


@admin.register(Gpu)
class GpuAdmin(ReadOnlyAdmin):
    list_display = [
        "__str__", "uuid", "state", "memory_used_mib", "memory_total_mib", "utilization_pct", "simulated",
        "updated_at",
    ]  # fmt: skip
    list_filter = ["state", "unavailable_cause", "simulated", "host"]
    search_fields = ["uuid", "name", "host__name"]
    list_select_related = ["host"]
    exclude = ["processes"]
    readonly_fields = ["process_list"]

    @admin.display(description="Processes")
    def process_list(self, gpu) -> str:
        return readable_json(gpu.processes)


@admin.register(MemorySample)
class MemorySampleAdmin(ReadOnlyAdmin):
    list_display = ["taken_at", "gpu", "instance_id", "used_mib", "total_mib"]
    list_filter = ["gpu__host"]
    list_select_related = ["gpu__host"]
    raw_id_fields = ["gpu"]
    date_hierarchy = None
    # The table holds millions of rows: no COUNT(*) on every page.
    show_full_result_count = False
    list_per_page = 100

    def get_paginator(self, request, queryset, per_page, orphans=0, allow_empty_first_page=True):
        from .paginators import EstimatedCountPaginator

        return EstimatedCountPaginator(queryset, per_page, orphans, allow_empty_first_page)


@admin.register(AlertRule)
class AlertRuleAdmin(admin.ModelAdmin):
    list_display = [
        "name", "kind", "enabled", "severity", "threshold", "hysteresis", "for_minutes", "window_minutes",
        "clear_minutes", "notify",
    ]  # fmt: skip
    list_editable = ["enabled"]
    list_filter = ["kind", "enabled", "severity"]
    search_fields = ["name"]


@admin.register(Alert)
class AlertAdmin(ReadOnlyAdmin):
    """Alerts are raised and resolved by the evaluation; admins acknowledge them."""

    list_display = [
        "started_at", "rule", "subject", "status", "message", "fired_at", "resolved_at", "acknowledged_by",
    ]  # fmt: skip
    list_filter = ["status", "rule__kind", "rule"]
    search_fields = ["message", "subject"]
    list_select_related = ["rule"]
    raw_id_fields = ["gpu", "host"]
    show_full_result_count = False
    actions = ["acknowledge"]

    @admin.action(description="Acknowledge the selected alerts")
    def acknowledge(self, request, queryset):
        for alert in queryset:
            alerts.acknowledge(alert, request.user.get_username())
        self.message_user(request, f"{queryset.count()} alert(s) acknowledged.")
