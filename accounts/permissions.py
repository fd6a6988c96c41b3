"""DRF permission classes for the three roles (see roles.py). A user without a role is authenticated but
may do nothing, so anonymous requests answer 401 and role-less or under-privileged ones 403."""

from rest_framework.permissions import SAFE_METHODS, BasePermission

from . import roles


class IsViewer(BasePermission):
    message = "You need the viewer role (or higher)."

    def has_permission(self, request, view):
        return roles.can_read(request.user)


class IsOperator(BasePermission):
    message = "You need the operator role (or higher)."

    def has_permission(self, request, view):
        return roles.can_load(request.user)


class IsAdminRole(BasePermission):
    message = "You need the admin role."

    def has_permission(self, request, view):
        return roles.can_administer(request.user)


class ReadViewerWriteAdmin(BasePermission):
    """Viewers read; only admins change (the model registry)."""

    message = "Changing this needs the admin role."

    def has_permission(self, request, view):
        if request.method in SAFE_METHODS:
            return roles.can_read(request.user)
        return roles.can_administer(request.user)


class PersonPresent(BasePermission):
    """Credentials change only with a person present: an API token (request.auth) may read, but creating,
    changing or deactivating users — passwords, roles, activation — needs a logged-in session. A leaked
    token must not be able to lock the owner out or make itself a new admin."""

    message = (
        "Changing users (passwords, roles, activation) needs a logged-in session; an API token may only read."
    )

    def has_permission(self, request, view):
        return request.method in SAFE_METHODS or request.auth is None
