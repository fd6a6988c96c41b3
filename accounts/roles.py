"""The three roles, as groups created by a migration. Superusers count as admins."""

VIEWER = "viewer"
OPERATOR = "operator"
ADMIN = "admin"
ROLES = (VIEWER, OPERATOR, ADMIN)
_RANK = {None: 0, VIEWER: 1, OPERATOR: 2, ADMIN: 3}


def role_of(user) -> str | None:
    """The highest role the user holds, or None. Cached on the user object for the request."""
    if user is None or not user.is_authenticated or not user.is_active:
        return None
    cached = getattr(user, "_llamacontroller_role", "unset")
    if cached != "unset":
        return cached
    if user.is_superuser:
        role = ADMIN
    else:
        # groups.all() uses a prefetch_related("groups") cache when a list view made one.
        names = {group.name for group in user.groups.all()}
        role = next((r for r in (ADMIN, OPERATOR, VIEWER) if r in names), None)
    user._llamacontroller_role = role
    return role


def has_role(user, needed: str) -> bool:
    return _RANK[role_of(user)] >= _RANK[needed]


def can_read(user) -> bool:
    return has_role(user, VIEWER)


def can_load(user) -> bool:
    return has_role(user, OPERATOR)


def can_manage_instance(user, instance) -> bool:
    """Unload or switch: operators their own instances, admins any."""
    if has_role(user, ADMIN):
        return True
    return has_role(user, OPERATOR) and instance.owner_id is not None and instance.owner_id == user.pk


def can_administer(user) -> bool:
    """The model registry, users, other people's instances, orphan processes."""
    return has_role(user, ADMIN)
