"""The alert engine: runs the rules of `gpus.alert_rules` over a host's fresh rows, moves each (rule, subject)
through pending / open / resolved (one live alert per pair, hysteresis, `for_minutes` and `clear_minutes`),
and schedules delivery.

Each host's refresh cycle calls `evaluate_host` right after it wrote its rows; telemetry failures are
evaluated for every host by `evaluate_telemetry` (a beat task on the default queue), since a host whose
worker is silent runs no refresh of its own. Firing and resolving send webhooks and e-mail through Celery
(`gpus.tasks.deliver_alert`) once the transaction commits.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.db import IntegrityError, transaction
from django.utils import timezone

from . import dispatch
from .alert_rules import (
    HOST_KINDS,
    InstanceFacts,
    Observation,
    leak_window_minutes,
    observe_host,
    telemetry_failing,
)
from .models import Alert, AlertRule, Gpu, Host, MemorySample

logger = logging.getLogger(__name__)

Kind = AlertRule.Kind
LIVE = (Alert.Status.PENDING, Alert.Status.OPEN)


@dataclass(frozen=True)
class Transition:
    alert_id: int
    rule_name: str
    event: str  # "fired" | "resolved"
    message: str
    instance_id: int | None
    gpu_id: int | None


# --- the state machine ----------------------------------------------------------------------------------


def apply(rule: AlertRule, alert: Alert | None, obs: Observation | None, host: Host, now: datetime):
    """Move one (rule, subject) on. `obs` None: the subject was not observed (gone, no verdict): it counts
    as clear. Returns the transition to announce, or None."""
    firing = obs is not None and obs.firing
    clear = obs is None or obs.clear
    if alert is None:
        if not firing:
            return None
        alert = Alert(
            rule=rule, subject=obs.subject, host=host, gpu_id=obs.gpu_id, instance_id=obs.instance_id,
            started_at=now, status=Alert.Status.PENDING,
        )  # fmt: skip
    if obs is not None and obs.message:
        alert.message = obs.message
    if obs is not None:
        alert.value = obs.value
    alert.evaluated_at = now
    event = None
    if firing:
        alert.clear_since = None
        if alert.status == Alert.Status.PENDING and now - alert.started_at >= timedelta(
            minutes=rule.for_minutes
        ):
            alert.status, alert.fired_at, event = Alert.Status.OPEN, now, "fired"
    elif alert.status == Alert.Status.PENDING:
        # The condition did not hold for `for_minutes`: forget it.
        if alert.pk:
            alert.delete()
        return None
    elif clear:
        alert.clear_since = alert.clear_since or now
        if now - alert.clear_since >= timedelta(minutes=rule.clear_minutes):
            alert.status, alert.resolved_at, event = Alert.Status.RESOLVED, now, "resolved"
    else:
        alert.clear_since = None  # between the threshold and the hysteresis: still open
    try:
        with transaction.atomic():
            alert.save()
    except IntegrityError:  # another evaluation of the same host created it a moment ago
        return None
    if event is None:
        return None
    if rule.notify:
        # on commit, robust: a broker that is down loses this delivery (logged), never the evaluation.
        dispatch.send_alert_delivery(alert.pk, event)
    logger.warning("alert %s: %s — %s", event, rule.name, alert.message)
    return Transition(alert.pk, rule.name, event, alert.message, alert.instance_id, alert.gpu_id)


def _run(rules, observations, live, host, now) -> list[Transition]:
    """observations: {(rule_id, subject): Observation}; live: the live alerts in scope."""
    transitions = []
    live_by_key = {(a.rule_id, a.subject): a for a in live}
    rules_by_id = {r.pk: r for r in rules}
    for key in set(observations) | set(live_by_key):
        rule = rules_by_id.get(key[0])
        alert = live_by_key.get(key)
        if rule is None:  # a disabled rule: its live alerts end
            rule = alert.rule
            if alert.status == Alert.Status.PENDING:
                alert.delete()
                continue
            obs = None
            rule.clear_minutes = 0
        else:
            obs = observations.get(key)
        moved = apply(rule, alert, obs, host, now)
        if moved:
            transitions.append(moved)
    return transitions


def evaluate_host(
    host_name: str, instances: list[InstanceFacts], now: datetime | None = None
) -> list[Transition]:
    """Evaluate the GPU and instance rules for one host after its refresh. Queries: the rules, the host's
    GPUs, its live alerts and — when a leak rule is enabled — the samples of the running instances over the
    longest leak window (the index on (instance_id, taken_at) serves it)."""
    now = now or timezone.now()
    host = Host.objects.filter(name=host_name).first()
    if host is None:
        return []
    rules = list(AlertRule.objects.filter(enabled=True, kind__in=HOST_KINDS))
    live = list(
        Alert.objects.filter(host=host, status__in=LIVE, rule__kind__in=HOST_KINDS).select_related("rule")
    )
    if not rules and not live:
        return []
    gpus = [g for g in Gpu.objects.filter(host=host).select_related("host") if g.index is not None]
    running = [f.instance_id for f in instances if f.status == "running"]
    series = instance_series(running, leak_window_minutes(rules), now)
    observations = observe_host(rules, gpus, instances, series, now)
    if not live and not any(o.firing for o in observations.values()):
        return []  # nothing to write: no transaction (on SQLite an immediate one would take the write lock)
    with transaction.atomic():
        return _run(rules, observations, live, host, now)


def instance_series(
    instance_ids: list[int], minutes: int, now: datetime
) -> dict[int, list[tuple[float, float]]]:
    """The instances' samples of the last `minutes` as (epoch seconds, MiB), one query over the window only."""
    if not instance_ids or not minutes:
        return {}
    rows = (
        MemorySample.objects.filter(
            instance_id__in=instance_ids,
            taken_at__gte=now - timedelta(minutes=minutes),
            used_mib__isnull=False,
        )
        .order_by()
        .values_list("instance_id", "taken_at", "used_mib")
    )
    series: dict[int, list[tuple[float, float]]] = {}
    for instance_id, taken_at, used in rows:
        series.setdefault(instance_id, []).append((taken_at.timestamp(), float(used)))
    return series


def evaluate_telemetry(now: datetime | None = None) -> list[Transition]:
    """Every host's telemetry (beat, default queue): a silent host runs no refresh to notice itself."""
    now = now or timezone.now()
    rules = list(AlertRule.objects.filter(enabled=True, kind=Kind.TELEMETRY_FAILING))
    live = list(
        Alert.objects.filter(status__in=LIVE, rule__kind=Kind.TELEMETRY_FAILING).select_related("rule")
    )
    if not rules and not live:
        return []
    hosts = list(Host.objects.all())
    gpus_of: dict[int, list[Gpu]] = {}
    for gpu in Gpu.objects.filter(host__in=hosts):
        gpus_of.setdefault(gpu.host_id, []).append(gpu)
    observed = {host.pk: telemetry_failing(host, gpus_of.get(host.pk, []), now) for host in hosts}
    if not live and not any(o.firing for o in observed.values()):
        return []
    transitions = []
    with transaction.atomic():
        for host in hosts:
            obs = observed[host.pk]
            observations = {(rule.pk, obs.subject): obs for rule in rules}
            transitions += _run(rules, observations, [a for a in live if a.host_id == host.pk], host, now)
        # Alerts of hosts deleted since: their host is gone, they resolve.
        orphaned = [a for a in live if a.host_id is None]
        if orphaned:
            transitions += _run(rules, {}, orphaned, None, now)
    return transitions


def acknowledge(alert: Alert, username: str) -> Alert:
    if alert.acknowledged_at is None:
        alert.acknowledged_at, alert.acknowledged_by = timezone.now(), username
        alert.save(update_fields=["acknowledged_at", "acknowledged_by"])
    return alert


def open_alerts():
    """The banner's and /metrics' alerts: open, newest first."""
    return Alert.objects.filter(status=Alert.Status.OPEN).select_related("rule", "gpu", "host")


def instance_windows() -> dict[str, timedelta]:
    """How far back crashed and evicted instances matter (one query): the longest window of the enabled rules
    of each kind, by kind; a kind without an enabled rule is absent."""
    rows = (
        AlertRule.objects.filter(enabled=True, kind__in=[Kind.INSTANCE_CRASHED, Kind.INSTANCE_EVICTED])
        .values_list("kind", "window_minutes")
        .order_by("window_minutes")
    )
    return {kind: timedelta(minutes=minutes) for kind, minutes in rows}  # the longest wins: ordered last
