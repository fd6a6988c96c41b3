"""The policy in the admin: quotas, reservations and pins, each change an audit event as through the API."""

from django import forms
from django.contrib import admin

from . import pins, quotas, reservations
from .models import DrainNotice, Pin, Quota, Reservation


class AuditedAdmin(admin.ModelAdmin):
    """Deleting goes through the service that writes the audit event (`remove`), one row at a time, also for
    the admin's bulk delete action."""

    def remove(self, obj, actor):
        raise NotImplementedError

    def delete_model(self, request, obj):
        self.remove(obj, request.user)

    def delete_queryset(self, request, queryset):
        for obj in queryset:
            self.remove(obj, request.user)


@admin.register(Quota)
class QuotaAdmin(AuditedAdmin):
    list_display = ["__str__", "gpu_memory_mib", "gpus", "models_loaded", "hard", "updated_at"]
    list_select_related = ["user", "group"]
    filter_horizontal = ["allowed_models"]
    search_fields = ["user__username", "group__name", "note"]

    def save_model(self, request, obj, form, change):
        obj._before = quotas.describe(Quota.objects.get(pk=obj.pk)) if change else None
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        # The allowed models are saved here, after the row: the event describes the quota as saved.
        super().save_related(request, form, formsets, change)
        quotas.record_saved(form.instance, request.user, before=getattr(form.instance, "_before", None))

    def remove(self, quota, actor):
        quotas.delete(quota, actor)


class ReservationForm(forms.ModelForm):
    """The API's checks: GPUs of the host or an amount of memory, and no conflict with another window."""

    class Meta:
        model = Reservation
        fields = [
            "host",
            "gpu_indices",
            "memory_mib",
            "start",
            "end",
            "users",
            "groups",
            "purpose",
            "notice_minutes",
        ]

    def clean(self):
        cleaned = super().clean()
        host, start, end = cleaned.get("host"), cleaned.get("start"), cleaned.get("end")
        indices = cleaned.get("gpu_indices") or []
        if not isinstance(indices, list) or not all(isinstance(i, int) and i >= 0 for i in indices):
            raise forms.ValidationError({"gpu_indices": "a list of GPU indices, e.g. [0, 1]"})
        if host and start and end:
            try:
                reservations.check(
                    host=host, start=start, end=end, gpu_indices=indices, memory_mib=cleaned.get("memory_mib"),
                    reservation_id=self.instance.pk,
                )  # fmt: skip
            except (ValueError, reservations.ReservationConflict) as exc:
                raise forms.ValidationError(str(exc)) from None
        if not cleaned.get("users") and not cleaned.get("groups"):
            raise forms.ValidationError("name at least one holder: users or groups")
        return cleaned


@admin.register(Reservation)
class ReservationAdmin(AuditedAdmin):
    form = ReservationForm
    list_display = [
        "purpose",
        "host",
        "gpu_indices",
        "memory_mib",
        "start",
        "end",
        "notice_minutes",
        "created_by",
    ]
    list_filter = ["host"]
    list_select_related = ["host", "created_by"]
    filter_horizontal = ["users", "groups"]
    search_fields = ["purpose"]
    date_hierarchy = "start"

    def save_model(self, request, obj, form, change):
        if not change:
            obj.created_by = request.user
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        if not change:
            reservations.record_created(form.instance, request.user)

    def remove(self, reservation, actor):
        reservations.delete(reservation, actor)


class PinForm(forms.ModelForm):
    class Meta:
        model = Pin
        fields = ["instance", "reason"]

    def clean_instance(self):
        instance = self.cleaned_data["instance"]
        if self.instance.pk is None and not instance.is_active:
            raise forms.ValidationError(f"instance #{instance.pk} is not loaded (it is {instance.status})")
        return instance


@admin.register(Pin)
class PinAdmin(AuditedAdmin):
    form = PinForm
    list_display = ["instance", "reason", "pinned_by", "pinned_at"]
    list_select_related = ["instance", "instance__host", "pinned_by"]
    raw_id_fields = ["instance"]

    def get_readonly_fields(self, request, obj=None):
        return ["instance"] if obj is not None else []

    def save_model(self, request, obj, form, change):
        if change:
            super().save_model(request, obj, form, change)
            return
        made = pins.pin(obj.instance, actor=request.user, reason=obj.reason)
        obj.pk, obj.pinned_by, obj.pinned_at = made.pk, made.pinned_by, made.pinned_at

    def remove(self, pinned, actor):
        pins.unpin(pinned, actor=actor)


@admin.register(DrainNotice)
class DrainNoticeAdmin(admin.ModelAdmin):
    """Read-only: written by the drain."""

    list_display = ["reservation", "instance", "noticed_at", "drained_at"]
    list_select_related = ["reservation", "instance"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False
