"""Alert rules: plain functions that turn the latest rows (and, for a leak, one window of samples) into
observations, and one state machine that turns observations into pending / open / resolved alerts.

`gpus` knows nothing of instances: `models_app` hands in what it knows as `InstanceFacts` (plain values).
Each host's refresh cycle calls `evaluate_host` right after it wrote its rows; telemetry failures are
evaluated for every host by `evaluate_telemetry` (a beat task on the default queue), since a host whose
worker is silent runs no refresh of its own. Firing and resolving send webhooks and e-mail through Celery
(`gpus.tasks.deliver_alert`) once the transaction commits.
"""

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.db import IntegrityError, transaction
from django.utils import timezone

from .models import Alert, AlertRule, Gpu, Host, MemorySample

logger = logging.getLogger(__name__)

Kind = AlertRule.Kind
LIVE = (Alert.Status.PENDING, Alert.Status.OPEN)
HOST_KINDS = (
    Kind.GPU_USED_PCT,
    Kind.GPU_HEADROOM,
    Kind.INSTANCE_LEAK,
    Kind.FOREIGN_PROCESS,
    Kind.INSTANCE_CRASHED,
)
# Fewer samples than this, or samples spanning less than this share of the window, give no slope.
LEAK_MIN_SAMPLES = 5
LEAK_MIN_SPAN = 0.5


@dataclass(frozen=True)
class InstanceFacts:
    """What a rule needs to know about an instance of the host, handed in by models_app."""

    instance_id: int
    label: str  # e.g. "Tiny (#12) on GPU 0,1"
    gpu_pks: tuple[int, ...]
    status: str  # the instance's status ("running", "crashed", …)
    ended_at: datetime | None = None  # crashed: when


@dataclass(frozen=True)
class Observation:
    """One rule on one subject at one moment. `firing`: past the threshold; `clear`: back past the
    threshold by the hysteresis (a value between the two keeps an open alert open)."""

    subject: str
    firing: bool
    clear: bool
    message: str = ""
    value: float | None = None
    gpu_id: int | None = None
    instance_id: int | None = None


@dataclass(frozen=True)
class Transition:
    alert_id: int
    rule_name: str
    event: str  # "fired" | "resolved"
    message: str
    instance_id: int | None
    gpu_id: int | None


# --- the rules: plain functions over values -----------------------------------------------------------


def _gpu_label(gpu: Gpu) -> str:
    return f"{gpu.host.name} GPU {gpu.index}"


def gpu_used_pct(rule: AlertRule, gpu: Gpu) -> Observation | None:
    if gpu.memory_used_mib is None or not gpu.memory_total_mib or gpu.state == Gpu.State.UNAVAILABLE:
        return None
    pct = gpu.memory_used_mib * 100 / gpu.memory_total_mib
    return Observation(
        subject=f"gpu:{gpu.pk}",
        firing=pct >= rule.threshold,
        clear=pct < rule.threshold - rule.hysteresis,
        message=f"{_gpu_label(gpu)}: {pct:.1f}% of its memory used ({gpu.memory_used_mib} / "
        f"{gpu.memory_total_mib} MiB; threshold {rule.threshold:g}%)",
        value=round(pct, 2),
        gpu_id=gpu.pk,
    )


def gpu_headroom(rule: AlertRule, gpu: Gpu) -> Observation | None:
    if gpu.memory_used_mib is None or not gpu.memory_total_mib or gpu.state == Gpu.State.UNAVAILABLE:
        return None
    free = gpu.memory_total_mib - gpu.memory_used_mib
    return Observation(
        subject=f"gpu:{gpu.pk}",
        firing=free <= rule.threshold,
        clear=free > rule.threshold + rule.hysteresis,
        message=f"{_gpu_label(gpu)}: only {free} MiB of {gpu.memory_total_mib} MiB free "
        f"(alert at {rule.threshold:g} MiB or less)",
        value=float(free),
        gpu_id=gpu.pk,
    )


def foreign_process(rule: AlertRule, gpu: Gpu) -> Observation | None:
    ours = gpu.state == Gpu.State.MODEL_LOADED or any(
        p.get("owner") == "instance" for p in gpu.processes or []
    )
    foreign = [p for p in gpu.processes or [] if p.get("owner") == "foreign"]
    names = ", ".join(
        f"{p.get('name') or '?'} (pid {p.get('pid')}, {p.get('used_mib')} MiB)" for p in foreign[:5]
    )
    return Observation(
        subject=f"gpu:{gpu.pk}",
        firing=bool(ours and foreign),
        clear=not (ours and foreign),
        message=f"{_gpu_label(gpu)} serves one of our models and also runs: {names}" if foreign else "",
        value=float(sum(p.get("used_mib") or 0 for p in foreign)),
        gpu_id=gpu.pk,
    )


def leak_slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of (seconds, MiB) points, in MiB per hour; None with fewer than two distinct
    times. The slope of every sample in the window, so one jump (a context growing once) weighs little."""
    n = len(points)
    if n < 2:
        return None
    mean_t = sum(t for t, _ in points) / n
    mean_y = sum(y for _, y in points) / n
    var = sum((t - mean_t) ** 2 for t, _ in points)
    if var == 0:
        return None
    cov = sum((t - mean_t) * (y - mean_y) for t, y in points)
    return cov / var * 3600


def leak_rate(points: list[tuple[float, float]]) -> float | None:
    """The growth a leak alert looks at, in MiB per hour: the least-squares slope over the window and over
    each half of it, whichever is lowest. A leak grows all along; one jump (a context filled once, a model
    loaded next to it) leaves one half flat and so does not count as a leak."""
    if len(points) < 4:
        return None
    times = [t for t, _ in points]
    middle = (min(times) + max(times)) / 2
    slopes = [
        leak_slope(points),
        leak_slope([p for p in points if p[0] <= middle]),
        leak_slope([p for p in points if p[0] >= middle]),
    ]
    return None if any(s is None for s in slopes) else min(slopes)


def instance_leak(
    rule: AlertRule, facts: InstanceFacts, points: list[tuple[float, float]]
) -> Observation | None:
    """`points`: the instance's samples of the rule's window, (seconds, MiB). No verdict on too few samples or
    on samples that cover less than half the window (a fresh load ramps up)."""
    window = rule.window_minutes * 60
    if (
        len(points) < LEAK_MIN_SAMPLES
        or max(t for t, _ in points) - min(t for t, _ in points) < window * LEAK_MIN_SPAN
    ):
        return None
    slope = leak_rate(points)
    if slope is None:
        return None
    return Observation(
        subject=f"instance:{facts.instance_id}",
        firing=slope >= rule.threshold,
        clear=slope < rule.threshold - rule.hysteresis,
        message=f"{facts.label}: memory growing {slope:.0f} MiB/h over the last {rule.window_minutes} min "
        f"(threshold {rule.threshold:g} MiB/h)",
        value=round(slope, 1),
        instance_id=facts.instance_id,
        gpu_id=facts.gpu_pks[0] if facts.gpu_pks else None,
    )


def instance_crashed(rule: AlertRule, facts: InstanceFacts, now: datetime) -> Observation | None:
    """Open from the crash for the rule's window (or until acknowledged and the window ends)."""
    if facts.status != "crashed" or facts.ended_at is None:
        return None
    recent = now - facts.ended_at < timedelta(minutes=rule.window_minutes)
    return Observation(
        subject=f"instance:{facts.instance_id}",
        firing=recent,
        clear=not recent,
        message=f"{facts.label} crashed at {timezone.localtime(facts.ended_at):%Y-%m-%d %H:%M:%S}",
        instance_id=facts.instance_id,
        gpu_id=facts.gpu_pks[0] if facts.gpu_pks else None,
    )


def telemetry_failing(host: Host, gpus: list[Gpu], now: datetime) -> Observation:
    """A host's GPU query fails, a GPU is not reported, or the host's worker is silent (no refresh for three
    intervals)."""
    silent_after = timedelta(seconds=3 * settings.GPU_REFRESH_SECONDS)
    problems = []
    if host.telemetry_error:
        problems.append(f"GPU query failed: {host.telemetry_error}")
    if host.last_seen is None or now - host.last_seen > silent_after:
        since = timezone.localtime(host.last_seen).strftime("%H:%M:%S") if host.last_seen else "never"
        problems.append(f"no telemetry since {since}")
    unavailable = [g for g in gpus if g.state == Gpu.State.UNAVAILABLE and g.index is not None]
    if unavailable and not host.telemetry_error:
        problems += [f"GPU {g.index} unavailable: {g.state_reason or 'no reason given'}" for g in unavailable]
    return Observation(
        subject=f"host:{host.pk}",
        firing=bool(problems),
        clear=not problems,
        message=f"{host.name}: " + "; ".join(problems) if problems else "",
    )


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
        from .tasks import deliver_alert

        # robust: a broker that is down loses this delivery (logged), never the evaluation.
        transaction.on_commit(lambda: deliver_alert.delay(alert.pk, event), robust=True)
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
    observations: dict[tuple[int, str], Observation] = {}

    def put(rule, obs):
        if obs is not None:
            observations[(rule.pk, obs.subject)] = obs

    leak_rules = [r for r in rules if r.kind == Kind.INSTANCE_LEAK]
    running = [f for f in instances if f.status == "running"]
    series = instance_series(
        [f.instance_id for f in running], max((r.window_minutes for r in leak_rules), default=0), now
    )
    for rule in rules:
        if rule.kind == Kind.GPU_USED_PCT:
            for gpu in gpus:
                put(rule, gpu_used_pct(rule, gpu))
        elif rule.kind == Kind.GPU_HEADROOM:
            for gpu in gpus:
                put(rule, gpu_headroom(rule, gpu))
        elif rule.kind == Kind.FOREIGN_PROCESS:
            for gpu in gpus:
                put(rule, foreign_process(rule, gpu))
        elif rule.kind == Kind.INSTANCE_LEAK:
            start = (now - timedelta(minutes=rule.window_minutes)).timestamp()
            for facts in running:
                points = [p for p in series.get(facts.instance_id, []) if p[0] >= start]
                put(rule, instance_leak(rule, facts, points))
        elif rule.kind == Kind.INSTANCE_CRASHED:
            for facts in instances:
                put(rule, instance_crashed(rule, facts, now))
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


def crash_window() -> timedelta | None:
    """How far back crashed instances matter: the longest window of the enabled crash rules."""
    minutes = (
        AlertRule.objects.filter(enabled=True, kind=Kind.INSTANCE_CRASHED)
        .order_by("-window_minutes")
        .values_list("window_minutes", flat=True)
        .first()
    )
    return timedelta(minutes=minutes) if minutes is not None else None
