"""The reservations page: a week view (Monday to Sunday, local time) of the reservations, each day's windows as
blocks naming the host/GPUs, the holders and the purpose; previous/next week links. Read-only: admins create
reservations in the admin or the API (`POST /api/v1/reservations/`)."""

from datetime import date, datetime, time, timedelta

from django.shortcuts import render
from django.utils import timezone
from django.views.decorators.http import require_GET

from accounts import roles
from accounts.decorators import role_required
from policy.models import Reservation
from policy.reservations import window_of

DAYS = 7


def week_start(value: str | None) -> date:
    """The Monday of the week holding `value` (YYYY-MM-DD; missing, unreadable or so far off that the week
    links would leave the calendar: this week)."""
    try:
        day = date.fromisoformat(value or "")
    except ValueError:
        day = None
    if day is None or not 1900 <= day.year <= 9000:
        day = timezone.localdate()
    return day - timedelta(days=day.weekday())


def _block(reservation: Reservation, day_start: datetime, day_end: datetime) -> dict:
    """One reservation's block on one day: its hours on that day ("all day", "from 09:00", "09:00–17:00")."""
    window = window_of(reservation)
    starts, ends = window.start > day_start, window.end < day_end
    if starts and ends:
        hours = f"{window.start:%H:%M}–{window.end:%H:%M}"
    elif starts:
        hours = f"from {window.start:%H:%M}"
    elif ends:
        hours = f"until {window.end:%H:%M}"
    else:
        hours = "all day"
    return {"id": reservation.pk, "where": window.where(), "hours": hours, "holders": window.holders,
            "purpose": window.purpose}  # fmt: skip


def week(monday: date) -> list[dict]:
    """The seven days from `monday`, each with the blocks of the reservations overlapping it, by host/GPU
    (one query for the reservations and one per holder table)."""
    zone = timezone.get_current_timezone()
    bounds = [
        timezone.make_aware(datetime.combine(monday + timedelta(days=i), time()), zone) for i in range(8)
    ]
    reservations = list(
        Reservation.objects.filter(start__lt=bounds[-1], end__gt=bounds[0])
        .select_related("host")
        .prefetch_related("users", "groups")
        .order_by("host__name", "start", "pk")
    )
    today = timezone.localdate()
    days = []
    for i in range(DAYS):
        start, end = bounds[i], bounds[i + 1]
        blocks = [_block(r, start, end) for r in reservations if r.start < end and r.end > start]
        blocks.sort(key=lambda b: b["where"])
        days.append({"date": start.date(), "today": start.date() == today, "blocks": blocks})
    return days


@require_GET
@role_required(roles.can_read)
def reservations(request):
    monday = week_start(request.GET.get("week"))
    context = {
        "days": week(monday),
        "monday": monday,
        "sunday": monday + timedelta(days=DAYS - 1),
        "previous_week": monday - timedelta(days=DAYS),
        "next_week": monday + timedelta(days=DAYS),
        "is_admin": roles.can_administer(request.user),
    }
    return render(request, "reservations.html", context)
