"""Changing users: roles, and the audit event that every change of a password, role or activation writes,
with its actor, whichever door it came through (API, admin, web)."""

from dataclasses import dataclass

from django.contrib.auth.models import Group

from . import audit, roles


@dataclass(frozen=True)
class Snapshot:
    """What the audit cares about in a user row."""

    role: str | None
    is_active: bool
    password: str


def _role(user) -> str | None:
    # Unlike roles.role_of, an inactive user keeps a role here: activation is reported on its own.
    if user.is_superuser:
        return roles.ADMIN
    names = set(user.groups.values_list("name", flat=True))
    return next((r for r in (roles.ADMIN, roles.OPERATOR, roles.VIEWER) if r in names), None)


def snapshot(user) -> Snapshot:
    return Snapshot(role=_role(user), is_active=user.is_active, password=user.password)


def changes(before: Snapshot, after: Snapshot) -> list[str]:
    said = []
    if before.password != after.password:
        said.append("password set")
    if before.role != after.role:
        said.append(f"role {before.role or 'none'} → {after.role or 'none'}")
    if before.is_active != after.is_active:
        said.append("activated" if after.is_active else "deactivated")
    return said


def record_change(user, before: Snapshot, *, actor) -> bool:
    """One USER_CHANGED event listing what changed since `before`; nothing when nothing did."""
    said = changes(before, snapshot(user))
    if said:
        audit.emit(audit.USER_CHANGED, actor=actor, detail=f"user {user.get_username()!r}: {', '.join(said)}")
    return bool(said)


def record_created(user, *, actor) -> None:
    after = snapshot(user)
    audit.emit(
        audit.USER_CHANGED,
        actor=actor,
        detail=f"user {user.get_username()!r} created with role {after.role or 'none'}"
        + ("" if after.is_active else ", inactive"),
    )


def record_deleted(username: str, *, actor) -> None:
    audit.emit(audit.USER_CHANGED, actor=actor, detail=f"user {username!r} deleted")


def set_role(user, role: str | None) -> None:
    """Put `user` in exactly one role group. Admins are made staff and superuser: the admin role is
    "everything" (registry, users, other people's instances, the Django admin), which is what superuser
    means, and it cannot drift out of date as models gain permissions the way a copied permission list
    would. Leaving the admin role takes both away again."""
    groups = Group.objects.filter(name__in=roles.ROLES)
    user.groups.remove(*groups)
    if role:
        user.groups.add(Group.objects.get(name=role))
    is_admin = role == roles.ADMIN
    if user.is_staff != is_admin or user.is_superuser != is_admin:
        user.is_staff = user.is_superuser = is_admin
        user.save(update_fields=["is_staff", "is_superuser"])
    user.__dict__.pop("_llamacontroller_role", None)
