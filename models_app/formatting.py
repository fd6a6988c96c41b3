"""How the product writes sizes, durations and times for people: one rule each, for every page, API text and
command. (The instance card's `Memory: A MiB / B MiB (P%)` line keeps its exact MiB figures: the specification this
project started from fixes that format, and scripts read it.)"""

from datetime import datetime

from django.utils import timezone

# One time format: 24-hour clock, ISO date (the admin and |date follow it too: llamacontroller_site/formats).
TIME_FORMAT = "%H:%M:%S"
DATETIME_FORMAT = "%Y-%m-%d %H:%M:%S"


def format_mib(mib: int | float | None) -> str:
    """A size given in MiB, as people read it: "340 MiB" below 1 GiB, "23.9 GiB" (one decimal) from 1 GiB on,
    "462 KiB" below 1 MiB (a file), "—" when unknown."""
    if mib is None:
        return "—"
    if 0 < abs(mib) < 1:
        return f"{round(mib * 1024)} KiB"
    if abs(mib) < 1024:
        return f"{round(mib)} MiB"
    return f"{mib / 1024:.1f} GiB"


def format_duration(seconds: int | float | None) -> str:
    """Uptime and elapsed time for people, as `ollama ps` shows them: "12s", "5m 3s", "2h 5m", "1d 3h"."""
    if seconds is None:
        return "-"
    minutes, secs = divmod(max(0, int(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    days, hours = divmod(hours, 24)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    if minutes:
        return f"{minutes}m {secs}s"
    return f"{secs}s"


def format_ms(ms: int | float | None) -> str:
    """A request's duration: "850 ms" below a second, "37.3 s" from a second on, "–" when unknown."""
    if ms is None:
        return "–"
    return f"{round(ms)} ms" if ms < 1000 else f"{ms / 1000:.1f} s"


def format_time(moment: datetime | None, with_date: bool = False) -> str:
    """A moment in the current time zone: "14:19:25", or "2026-12-06 14:19:25"."""
    if moment is None:
        return "—"
    return timezone.localtime(moment).strftime(DATETIME_FORMAT if with_date else TIME_FORMAT)
