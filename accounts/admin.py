from django.contrib import admin, messages
from django.contrib.auth import get_user_model
from django.contrib.auth.admin import UserAdmin
from django.db import transaction
from django.shortcuts import redirect
from django.urls import reverse

from . import audit, roles, tokens, users
from .models import ApiToken, PasswordCheckFailures
from .views import AdminPasswordChangeView


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    """Issue, rename, revoke. A token's user and expiry are fixed when it is issued: moving a token to
    another user or extending it would be a new credential nobody issued. Every change is an event."""

    list_display = ["name", "user", "hint", "created_at", "expires_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["name", "user__username", "hint"]
    list_select_related = ["user"]
    actions = ["revoke_selected"]

    def get_fields(self, request, obj=None):
        if obj is None:  # issuing: the rest is generated
            return ["user", "name", "expires_at"]
        return [
            "user",
            "name",
            "hint",
            "token_hash",
            "created_at",
            "expires_at",
            "last_used_at",
            "revoked_at",
        ]

    def get_readonly_fields(self, request, obj=None):
        fixed = ["token_hash", "hint", "created_at", "last_used_at", "revoked_at"]
        return fixed if obj is None else ["user", "expires_at", *fixed]

    def save_model(self, request, obj, form, change):
        if change:
            # Only the name is editable (see get_readonly_fields); it is saved, with its event, here.
            tokens.rename(token=obj, name=obj.name, actor=request.user)
            return
        # Issued like on the Tokens page: hashed, audited, and shown once — here, in the message.
        token, raw = tokens.issue(user=obj.user, name=obj.name, expires_at=obj.expires_at, actor=request.user)
        obj.pk, obj.token_hash, obj.hint, obj.created_at = (
            token.pk,
            token.token_hash,
            token.hint,
            token.created_at,
        )
        self.message_user(
            request, f"Token for {obj.user}: {raw} — copy it now, it is not shown again.", messages.WARNING
        )

    def delete_model(self, request, obj):
        tokens.delete(token=obj, actor=request.user)

    def delete_queryset(self, request, queryset):
        for token in queryset.select_related("user"):
            tokens.delete(token=token, actor=request.user)

    @admin.action(description="Revoke selected tokens")
    def revoke_selected(self, request, queryset):
        revoked = sum(
            tokens.revoke(token=token, actor=request.user) for token in queryset.select_related("user")
        )
        self.message_user(request, f"Revoked {revoked} token(s).", messages.SUCCESS)


User = get_user_model()


class AuditedUserAdmin(UserAdmin):
    """Django's user admin, with an event for every password, role or activation change. Your own
    password is changed on the admin's "Change password" page, which asks for the current one."""

    def save_model(self, request, obj, form, change):
        # The groups (and so the role) are saved after this, in save_related: compare there.
        request._user_before = users.snapshot(User.objects.get(pk=obj.pk)) if change else None
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change):
        super().save_related(request, form, formsets, change)
        before = getattr(request, "_user_before", None)
        if before is None:
            users.record_created(form.instance, actor=request.user)
        else:
            users.record_change(form.instance, before, actor=request.user)

    def user_change_password(self, request, id, form_url=""):
        if str(request.user.pk) == str(id):
            return redirect("admin:password_change")
        target = User.objects.filter(pk=id).first()
        before = users.snapshot(target) if target else None
        with transaction.atomic():
            response = super().user_change_password(request, id, form_url)
            if target is not None and request.method == "POST" and response.status_code == 302:
                target.refresh_from_db()
                users.record_change(target, before, actor=request.user)
        return response

    def delete_model(self, request, obj):
        username = obj.get_username()
        with transaction.atomic():
            super().delete_model(request, obj)
            users.record_deleted(username, actor=request.user)

    def delete_queryset(self, request, queryset):
        with transaction.atomic():
            names = list(queryset.values_list("username", flat=True))
            super().delete_queryset(request, queryset)
            for username in names:
                users.record_deleted(username, actor=request.user)


admin.site.unregister(User)
admin.site.register(User, AuditedUserAdmin)


def _admin_site_permission(request) -> bool:
    # Only the admin role uses the Django admin; a stray is_staff flag on a viewer does not open it.
    return request.user.is_active and request.user.is_staff and roles.can_administer(request.user)


admin.site.has_permission = _admin_site_permission


def _audited_admin_password_change(request, extra_context=None):
    """The admin's own "Change password" page, as AdminSite.password_change serves it, with the current
    password throttled like logins (accounts/throttle.py) and an event when done."""
    request.current_app = admin.site.name
    response = AdminPasswordChangeView.as_view(
        success_url=reverse("admin:password_change_done", current_app=admin.site.name),
        extra_context={**admin.site.each_context(request), **(extra_context or {})},
    )(request)
    if request.method == "POST" and response.status_code == 302:
        audit.emit(
            audit.USER_CHANGED,
            actor=request.user,
            detail=f"user {request.user.get_username()!r}: password set (own, current password given)",
        )
    return response


admin.site.password_change = _audited_admin_password_change


@admin.register(PasswordCheckFailures)
class PasswordCheckFailuresAdmin(admin.ModelAdmin):
    """Wrong current passwords per user (accounts/throttle.py); deleting a row lifts its lock at once."""

    list_display = ["user", "failures", "last_failure_at", "locked_until"]
    raw_id_fields = ["user"]
    readonly_fields = ["failures", "last_failure_at", "locked_until"]
