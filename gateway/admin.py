from django.contrib import admin

from .models import UsageRecord


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    """Read-only: usage records are written by the gateway only."""

    list_display = (
        "created_at", "user", "model_id", "endpoint", "status", "prompt_tokens", "completion_tokens",
        "time_to_first_token_ms", "duration_ms", "client_disconnected", "throttled",
    )  # fmt: skip
    list_filter = ("endpoint", "status", "throttled", "client_disconnected", "model_id")
    search_fields = ("user__username", "model_id", "error")
    date_hierarchy = "created_at"
    list_select_related = ("user",)
    raw_id_fields = ("user", "token")
    show_full_result_count = False

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
