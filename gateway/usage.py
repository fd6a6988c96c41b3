"""Usage records: writing one, pruning, and the per-user and per-model figures of the usage page."""

from datetime import timedelta

from django.conf import settings
from django.db.models import Count, F, FloatField, Q, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from accounts.roles import can_administer
from utilities.dbutil import insert

from .models import UsageRecord


def record(**values) -> None:
    """One usage record, each value prepared by its field as UsageRecord.objects.create(**values) would (by
    attname: user_id, token_id, ...; every field but the id given), written by one plain INSERT
    (utilities.dbutil.insert): the ORM's way to it cost the web worker more than the database's work, once per
    request."""
    insert(UsageRecord, values)


def prune(now=None) -> int:
    """Delete records older than the retention (by the indexed created_at), in batches."""
    cutoff = (now or timezone.now()) - timedelta(days=settings.USAGE_RETENTION_DAYS)
    deleted = 0
    while True:
        ids = list(UsageRecord.objects.filter(created_at__lt=cutoff).values_list("id", flat=True)[:5000])
        if not ids:
            return deleted
        deleted += UsageRecord.objects.filter(id__in=ids).delete()[0]


def visible_to(user):
    """Admins see everyone's records, everybody else their own."""
    records = UsageRecord.objects.all()
    if can_administer(user):
        return records
    return records.filter(user=user) if user.is_authenticated else records.none()


def summary(records, group_by: str) -> list[dict]:
    """requests, prompt and completion tokens, errors, throttled requests (held back by fair use) and
    generation speed per `group_by` value."""
    generating = Q(completion_tokens__gt=0, time_to_first_token_ms__isnull=False)
    rows = (
        records.values(group_by)
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=Q(status__gte=400) | ~Q(error="")),
            throttled=Count("id", filter=~Q(throttled="")),
            prompt_total=Coalesce(Sum("prompt_tokens"), 0),
            completion_total=Coalesce(Sum("completion_tokens"), 0),
            generated=Coalesce(Sum("completion_tokens", filter=generating), 0),
            generating_ms=Coalesce(
                Sum(
                    F("duration_ms") - F("time_to_first_token_ms"),
                    filter=generating,
                    output_field=FloatField(),
                ),
                0.0,
            ),
        )
        .order_by("-requests")
    )
    result = []
    for row in rows:
        seconds = row.pop("generating_ms") / 1000
        generated = row.pop("generated")
        row["tokens_per_second"] = round(generated / seconds, 1) if seconds > 0 else None
        result.append(row)
    return result
