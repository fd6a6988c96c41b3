"""Memory history, downsampled in the database: one GROUP BY over a computed bucket (epoch seconds divided by
the resolution), giving each bucket's max and mean, so that a series never has more than `MAX_POINTS` points
whatever the number of samples. Works on SQLite and PostgreSQL; the (gpu, taken_at) and
(instance_id, taken_at) indexes bound the scan to the window."""

import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from django.db import models
from django.db.models import Avg, Max, Q
from django.utils import timezone

from utilities.query import BadParameter, whole_number

from .models import Alert, MemorySample

WINDOWS = {"1h": 3600, "24h": 24 * 3600, "7d": 7 * 24 * 3600}
MAX_POINTS = 500
# Automatic resolutions: the first of these that keeps a window within MAX_POINTS.
NICE_STEPS = [15, 30, 60, 120, 300, 600, 900, 1200, 1800, 3600, 7200, 10800, 21600, 43200, 86400]


class HistoryError(ValueError):
    """A bad `window` or `resolution`; `field` names which."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


class EpochBucket(models.Func):
    """floor(epoch seconds of `expression` / step), as an integer, on SQLite and PostgreSQL."""

    output_field = models.BigIntegerField()

    def __init__(self, expression, step: int):
        super().__init__(expression)
        self.step = int(step)

    def as_sqlite(self, compiler, connection):
        sql, params = compiler.compile(self.source_expressions[0])
        # Integer division of non-negative integers floors.
        return f"(CAST(strftime('%%s', {sql}) AS INTEGER) / {self.step})", params

    def as_postgresql(self, compiler, connection):
        sql, params = compiler.compile(self.source_expressions[0])
        return f"CAST(FLOOR(EXTRACT(EPOCH FROM {sql}) / {self.step}) AS BIGINT)", params

    def as_sql(self, compiler, connection, **extra):  # other databases: not supported
        raise NotImplementedError(f"memory history buckets are not implemented for {connection.vendor}")


@dataclass(frozen=True)
class Span:
    window: str
    resolution: int
    start: datetime
    end: datetime


def parse_span(window: str | None, resolution: str | None, now: datetime | None = None) -> Span:
    """`window`: 1h, 24h or 7d (default 1h); `resolution`: seconds per point (default: the smallest of the
    nice steps that gives at most MAX_POINTS points). Raises HistoryError naming the field."""
    window = window or "1h"
    if window not in WINDOWS:
        raise HistoryError("window", f"must be one of {', '.join(WINDOWS)}")
    seconds = WINDOWS[window]
    least = math.ceil(seconds / MAX_POINTS)
    if resolution in (None, "", "auto"):
        step = next(s for s in NICE_STEPS if s >= least)
    else:
        try:
            step = whole_number(resolution, "resolution", least, seconds)
        except BadParameter:
            raise HistoryError(
                "resolution",
                f"must be auto or a whole number of seconds from {least} to {seconds} for window {window} "
                f"(at most {MAX_POINTS} points per series)",
            ) from None
    end = now or timezone.now()
    # Whole buckets: the first starts on a multiple of the step, so points do not shift between calls.
    start_epoch = (int(end.timestamp()) - seconds) // step * step
    return Span(window, step, datetime.fromtimestamp(start_epoch, tz=UTC), end)


def downsample(filter_q: Q, span: Span) -> list[dict]:
    """Bucketed max and mean of used memory (MiB) over the span, oldest first: one query."""
    rows = (
        MemorySample.objects.filter(filter_q, taken_at__gte=span.start, taken_at__lte=span.end)
        .annotate(bucket=EpochBucket("taken_at", span.resolution))
        .values("bucket")
        .annotate(used_max=Max("used_mib"), used_mean=Avg("used_mib"), total=Max("total_mib"))
        .order_by("bucket")
    )
    return [
        {
            "t": row["bucket"] * span.resolution,
            "max_mib": row["used_max"],
            "mean_mib": None if row["used_mean"] is None else round(float(row["used_mean"]), 1),
            "total_mib": row["total"],
        }
        for row in rows
    ]


def gpu_series(gpu_id: int, span: Span) -> list[dict]:
    return downsample(Q(gpu_id=gpu_id), span)


def instance_series(instance_id: int, span: Span) -> list[dict]:
    return downsample(Q(instance_id=instance_id), span)


def alert_events(filter_q: Q, span: Span) -> list[dict]:
    """Alerts that fired or resolved within the span, as time-axis marks."""
    alerts = (
        Alert.objects.filter(filter_q, status__in=[Alert.Status.OPEN, Alert.Status.RESOLVED])
        .filter(Q(fired_at__gte=span.start) | Q(resolved_at__gte=span.start) | Q(status=Alert.Status.OPEN))
        .select_related("rule")[:200]
    )
    events = []
    for alert in alerts:
        if alert.fired_at and alert.fired_at >= span.start:
            events.append(mark(alert.fired_at, "alert_fired", f"{alert.rule.name}: {alert.message}"))
        if alert.resolved_at and alert.resolved_at >= span.start:
            events.append(mark(alert.resolved_at, "alert_resolved", f"resolved: {alert.rule.name}"))
    return events


def mark(moment: datetime, kind: str, text: str) -> dict:
    return {"t": int(moment.timestamp()), "at": moment.isoformat(), "kind": kind, "text": text}


def summary(points: list[dict]) -> dict:
    """Figures for pages without JavaScript: peak, mean and latest of the span."""
    peaks = [p["max_mib"] for p in points if p["max_mib"] is not None]
    means = [p["mean_mib"] for p in points if p["mean_mib"] is not None]
    return {
        "peak_mib": max(peaks) if peaks else None,
        "mean_mib": round(sum(means) / len(means), 1) if means else None,
        "latest_mib": peaks[-1] if peaks else None,
        "points": len(points),
    }


def window_choices() -> list[str]:
    return list(WINDOWS)


def lookback(window: str) -> timedelta:
    return timedelta(seconds=WINDOWS[window])
