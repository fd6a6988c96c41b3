"""Reservations against the database: creation with its conflicts refused, who holds one, whether one blocks a
load (admission calls `blocks` and `held_back_mib`). The drain before a window starts is drain.py; the window
logic itself is windows.py (plain Python). Admission (models_app) imports this module: it imports no models_app
service, so no circle."""

from datetime import datetime, timedelta

from django.db import transaction
from django.utils import timezone

from gpus.models import Host
from utilities.dbutil import select

from . import audit, windows
from .models import Reservation
from .reasons import PolicyRefusal


class ReservationConflict(Exception):
    """A reservation refused at creation (409): it overlaps another on a shared GPU, or holds more memory than
    the host has."""


def holders_text(reservation: Reservation) -> str:
    names = [f"group {g.name}" for g in reservation.groups.all()]
    names += [u.get_username() for u in reservation.users.all()]
    return ", ".join(sorted(names)) or "nobody"


def window_of(reservation: Reservation) -> windows.Window:
    """The reservation as windows.py reads it, in local time (sentences show it)."""
    return windows.Window(
        reservation_id=reservation.pk,
        host=reservation.host.name,
        start=timezone.localtime(reservation.start),
        end=timezone.localtime(reservation.end),
        gpu_indices=frozenset(reservation.gpu_indices or ()),
        memory_mib=reservation.memory_mib,
        purpose=reservation.purpose,
        holders=holders_text(reservation),
        notice=timedelta(minutes=reservation.notice_minutes),
    )


def is_holder(reservation: Reservation, user) -> bool:
    if user is None or not getattr(user, "is_authenticated", False):
        return False
    if any(u.pk == user.pk for u in reservation.users.all()):
        return True
    groups = {g.pk for g in reservation.groups.all()}
    return bool(groups) and user.groups.filter(pk__in=groups).exists()


def gpu_totals(host: Host) -> dict[int, int]:
    """Each GPU index of the host -> its memory (MiB); replaced GPUs (no index) are not reservable."""
    return dict(host.gpus.exclude(index=None).values_list("index", "memory_total_mib"))


def _on_host(host: Host, after: datetime):
    return (
        Reservation.objects.filter(host=host, end__gt=after)
        .select_related("host")
        .prefetch_related("users", "groups")
        .order_by("start", "pk")
    )


def check(
    *, host: Host, start, end, gpu_indices=(), memory_mib=None, reservation_id: int | None = None
) -> None:
    """Raise ValueError (bad input) or ReservationConflict (the reason in words) when a reservation of these
    GPUs (or this memory) of `host` from `start` to `end` cannot be made; `reservation_id`: the one being
    changed (the admin), which cannot conflict with itself."""
    indices = sorted(set(gpu_indices or ()))
    if bool(indices) == bool(memory_mib):
        raise ValueError("give either GPU indices or an amount of memory (MiB), not both or neither")
    if end <= start:
        raise ValueError("the end must come after the start")
    totals = gpu_totals(host)
    missing = [i for i in indices if i not in totals]
    if missing:
        raise ValueError(f"{host.name} has no GPU {','.join(map(str, missing))}")
    local = timezone.localtime
    new = windows.Window(reservation_id, host.name, local(start), local(end), frozenset(indices), memory_mib)
    existing = [window_of(r) for r in _on_host(host, after=start)]
    reason = windows.conflict(new, existing, totals, sum(totals.values()))
    if reason:
        raise ReservationConflict(reason)


def record_created(reservation: Reservation, actor) -> None:
    """The audit event of a new reservation (after its holders are set)."""
    window = window_of(reservation)
    audit.reservation_changed(
        actor, f"{window.label()} created: {window.where()} from {windows.when(window.start)} to "
        f"{windows.when(window.end)}, notice {reservation.notice_minutes} min",
    )  # fmt: skip


def create(*, host: Host, start, end, purpose: str, actor, gpu_indices=(), memory_mib=None,
           users=(), groups=(), notice_minutes: int = 30) -> Reservation:  # fmt: skip
    """Create a reservation, or raise ReservationConflict or ValueError (`check`). The host row is locked
    first (PostgreSQL; SQLite's immediate transactions serialise the same code), so two overlapping creations
    cannot both pass."""
    with transaction.atomic():
        host = Host.objects.select_for_update().get(pk=host.pk)
        check(host=host, start=start, end=end, gpu_indices=gpu_indices, memory_mib=memory_mib)
        reservation = Reservation.objects.create(
            host=host, gpu_indices=sorted(set(gpu_indices or ())), memory_mib=memory_mib, start=start, end=end,
            purpose=purpose, notice_minutes=notice_minutes,
            created_by=actor if getattr(actor, "is_authenticated", False) else None,
        )  # fmt: skip
        reservation.users.set(users)
        reservation.groups.set(groups)
        record_created(reservation, actor)
    return reservation


def delete(reservation: Reservation, actor) -> None:
    """Remove a reservation (its GPUs return to everyone at once); the audit keeps what it was."""
    with transaction.atomic():
        window = window_of(reservation)
        audit.reservation_changed(
            actor, f"{window.label()} removed (was {window.where()} from {windows.when(window.start)} to "
            f"{windows.when(window.end)})",
        )  # fmt: skip
        reservation.delete()


def fencing(host: Host, at: datetime | None = None) -> list[Reservation]:
    """The host's reservations that keep others out at `at` (from the notice before the start to the end)."""
    at = at or timezone.now()
    if not select(Reservation, {"host_id": host.pk, "end__gt": at}, columns=("id",), limit=1):
        return []  # the usual case, asked on every load's way: one plain SELECT (utilities.dbutil)
    return [r for r in _on_host(host, after=at) if r.start - timedelta(minutes=r.notice_minutes) <= at]


def blocks(
    user, host: Host, gpu_indices, *, model_id: str = "this model", at=None, fenced=None
) -> PolicyRefusal | None:
    """Admission's question for a load by `user` on GPUs `gpu_indices` of `host`: the `reservation` refusal
    (409, a sentence naming the holders, the purpose and the end; retry_after until the end) when a window
    that `user` does not hold covers one of them at `at` (default now), else None. `fenced`: `fencing(host,
    at)` already read (admission reads it once for this and `held_back_mib`)."""
    at = at or timezone.now()
    wanted = set(gpu_indices)
    for reservation in fencing(host, at) if fenced is None else fenced:
        if wanted & set(reservation.gpu_indices or ()) and not is_holder(reservation, user):
            until_end = int((reservation.end - at).total_seconds())
            return windows.blocked(window_of(reservation), model_id, until_end)
    return None


def held_back_mib(user, host: Host, at=None, fenced=None) -> int:
    """MiB of `host` that memory reservations keep from `user` at `at`: admission treats the host as that much
    smaller for them (sum of claims on the host + this + the new claim must fit the host's total). `fenced`:
    `fencing(host, at)` already read."""
    fenced = fencing(host, at) if fenced is None else fenced
    return sum(r.memory_mib or 0 for r in fenced if not r.gpu_indices and not is_holder(r, user))
