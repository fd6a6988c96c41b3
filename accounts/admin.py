from django.contrib import admin, messages

from . import roles, tokens
from .forms import LockoutAdminAuthenticationForm
from .models import ApiToken, LoginFailure


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "hint", "created_at", "expires_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["name", "user__username", "hint"]
    list_select_related = ["user"]
    readonly_fields = ["token_hash", "hint", "created_at", "last_used_at", "revoked_at"]
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

    def save_model(self, request, obj, form, change):
        if change:
            return super().save_model(request, obj, form, change)
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

    @admin.action(description="Revoke selected tokens")
    def revoke_selected(self, request, queryset):
        revoked = sum(
            tokens.revoke(token=token, actor=request.user) for token in queryset.select_related("user")
        )
        self.message_user(request, f"Revoked {revoked} token(s).", messages.SUCCESS)


@admin.register(LoginFailure)
class LoginFailureAdmin(admin.ModelAdmin):
    list_display = ["username", "ip_address", "created_at"]
    search_fields = ["username", "ip_address"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False


# The admin's own login page honours the lockout too (staff accounts are the ones worth guessing).
admin.site.login_form = LockoutAdminAuthenticationForm


def _admin_site_permission(request) -> bool:
    # Only the admin role uses the Django admin; a stray is_staff flag on a viewer does not open it.
    return request.user.is_active and request.user.is_staff and roles.can_administer(request.user)


admin.site.has_permission = _admin_site_permission
