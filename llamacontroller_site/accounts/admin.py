from django.contrib import admin

from . import roles
from .forms import LockoutAdminAuthenticationForm
from .models import ApiToken, LoginFailure


@admin.register(ApiToken)
class ApiTokenAdmin(admin.ModelAdmin):
    list_display = ["name", "user", "hint", "created_at", "expires_at", "last_used_at", "revoked_at"]
    list_filter = ["revoked_at"]
    search_fields = ["name", "user__username", "hint"]
    list_select_related = ["user"]
    readonly_fields = ["token_hash", "hint", "created_at", "last_used_at"]

    def has_add_permission(self, request):
        # A token is shown once when issued: create them on the Tokens page or through the API.
        return False


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
