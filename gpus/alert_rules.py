"""Alert rules: what condition raises and clears which alert, and in what words. Plain functions that turn the
latest rows (and, for a leak, one window of samples) into observations; `gpus.alerts` (the engine) runs them
and turns observations into pending / open / resolved alerts. This module does not know the engine.

`gpus` knows nothing of instances: `models_app` hands in what it knows as `InstanceFacts` (plain values).
"""

from dataclasses import dataclass
from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from .models import AlertRule, Gpu, Host

Kind = AlertRule.Kind
# The kinds a host's refresh evaluates; telemetry failing is evaluated for every host at once.
HOST_KINDS = (
    Kind.GPU_USED_PCT,
    Kind.GPU_HEADROOM,
    Kind.INSTANCE_LEAK,
    Kind.FOREIGN_PROCESS,
    Kind.INSTANCE_CRASHED,
    Kind.INSTANCE_EVICTED,
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
    ended_at: datetime | None = None  # crashed or evicted: when
    evicted: str = ""  # evicted to make room: the eviction's sentence (who, for whom, why)


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


def _open_for_window(rule: AlertRule, facts: InstanceFacts, now: datetime, subject: str, message: str):
    """An alert open from `facts.ended_at` for the rule's window (or until acknowledged and the window ends)."""
    recent = now - facts.ended_at < timedelta(minutes=rule.window_minutes)
    return Observation(
        subject=subject,
        firing=recent,
        clear=not recent,
        message=message,
        instance_id=facts.instance_id,
        gpu_id=facts.gpu_pks[0] if facts.gpu_pks else None,
    )


def instance_crashed(rule: AlertRule, facts: InstanceFacts, now: datetime) -> Observation | None:
    """Open from the crash for the rule's window."""
    if facts.status != "crashed" or facts.ended_at is None:
        return None
    at = timezone.localtime(facts.ended_at)
    return _open_for_window(
        rule, facts, now, f"instance:{facts.instance_id}", f"{facts.label} crashed at {at:%Y-%m-%d %H:%M:%S}"
    )


def instance_evicted(rule: AlertRule, facts: InstanceFacts, now: datetime) -> Observation | None:
    """Open from the eviction for the rule's window: the channels hear who lost their model, for whom and why."""
    if not facts.evicted or facts.ended_at is None:
        return None
    return _open_for_window(rule, facts, now, f"instance:{facts.instance_id}:evicted", facts.evicted)


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


def leak_window_minutes(rules: list[AlertRule]) -> int:
    """How far back `observe_host` needs the running instances' samples: the longest leak window (0: none)."""
    return max((r.window_minutes for r in rules if r.kind == Kind.INSTANCE_LEAK), default=0)


def observe_host(
    rules: list[AlertRule],
    gpus: list[Gpu],
    instances: list[InstanceFacts],
    series: dict[int, list[tuple[float, float]]],
    now: datetime,
) -> dict[tuple[int, str], Observation]:
    """Each host rule over the host's GPUs or instances: {(rule id, subject): observation}; a subject with no
    verdict is left out. `series`: the running instances' samples, (seconds, MiB), over at least
    `leak_window_minutes(rules)`."""
    observations: dict[tuple[int, str], Observation] = {}

    def put(rule, obs):
        if obs is not None:
            observations[(rule.pk, obs.subject)] = obs

    running = [f for f in instances if f.status == "running"]
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
        elif rule.kind == Kind.INSTANCE_EVICTED:
            for facts in instances:
                put(rule, instance_evicted(rule, facts, now))
    return observations
