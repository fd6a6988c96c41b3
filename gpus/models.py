from datetime import timedelta

from django.conf import settings
from django.db import models
from django.utils import timezone


def alive_cutoff():
    """A host whose worker was heard of (heartbeat, GPU refresh, reconcile pass) after this is up."""
    return timezone.now() - timedelta(seconds=settings.HOST_TIMEOUT_SECONDS)


class HostQuerySet(models.QuerySet):
    def up(self):
        return self.filter(last_seen__gte=alive_cutoff())

    def down(self):
        cutoff = alive_cutoff()
        return self.filter(models.Q(last_seen__lt=cutoff) | models.Q(last_seen=None, created_at__lt=cutoff))


class Host(models.Model):
    """A machine with GPUs and a Celery worker that consumes the queue `host.<name>`. One worker holds a host
    name at a time (the `worker_*` fields name it, see models_app/cluster.py); it heartbeats `last_seen`
    every LLAMACONTROLLER_HOST_HEARTBEAT_SECONDS, and a host silent past LLAMACONTROLLER_HOST_TIMEOUT_SECONDS
    is down."""

    name = models.CharField(max_length=100, unique=True)
    telemetry_backend = models.CharField(max_length=20, blank=True, help_text="Backend the worker uses.")
    telemetry_error = models.TextField(blank=True, help_text="Why the last GPU query failed, if it did.")
    llama_server = models.CharField(max_length=500, blank=True, help_text="llama-server the worker resolved.")
    llama_server_error = models.TextField(blank=True)
    last_seen = models.DateTimeField(null=True, blank=True, help_text="The worker's last heartbeat.")
    # The worker that holds the host name: a second one refuses to start while this one is alive.
    worker_machine_id = models.CharField(max_length=100, blank=True)
    worker_hostname = models.CharField(max_length=255, blank=True)
    worker_pid = models.PositiveIntegerField(null=True, blank=True)
    worker_started_at = models.DateTimeField(null=True, blank=True)
    # How the web node and the gateway reach this host's llama-servers (LLAMACONTROLLER_LLAMA_SERVER_HOST,
    # or LLAMACONTROLLER_HOST_ADDRESS where that is 0.0.0.0).
    address = models.CharField(max_length=255, blank=True, default="127.0.0.1")
    created_at = models.DateTimeField(auto_now_add=True)
    # When its GPUs were last marked unavailable for its silence: once per silence, so an admin's clearing
    # sticks (see models_app/hosts.py).
    gpus_marked_at = models.DateTimeField(null=True, blank=True)

    objects = HostQuerySet.as_manager()

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

    @property
    def is_up(self) -> bool:
        return self.last_seen is not None and self.last_seen >= alive_cutoff()

    @property
    def state(self) -> str:
        return "up" if self.is_up else "down"

    def down_prefix(self) -> str:
        """How every down_reason of this host begins (wording only: the GPU marks are found by
        Gpu.unavailable_cause)."""
        return f"host {self.name} not heard from"

    def down_reason(self) -> str:
        """Why the host counts as down, e.g. "host gpu-box-2 not heard from since 10:42"."""
        if self.last_seen is None:
            return f"{self.down_prefix()} yet"
        return f"{self.down_prefix()} since {timezone.localtime(self.last_seen):%H:%M}"

    @property
    def queue(self) -> str:
        return f"host.{self.name}"


class Gpu(models.Model):
    """One GPU of a host, identified by its uuid. The latest telemetry is copied onto the row so that
    pages never scan the sample history. A GPU that vanishes is marked unavailable, never deleted."""

    class State(models.TextChoices):
        IDLE = "idle", "Idle"
        MODEL_LOADED = "model_loaded", "Model loaded"
        OCCUPIED_BY_OTHERS = "occupied_by_others", "Occupied by others"
        UNAVAILABLE = "unavailable", "Unavailable"

    class Cause(models.TextChoices):
        """Why an unavailable GPU is so, where code reads it back (state_reason says it for people)."""

        NONE = "", "—"
        HOST_DOWN = "host_down", "Host not heard from"

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="gpus")
    # Empty for a GPU replaced by another card at its index: it stays (history, instances) but answers to
    # no index any more.
    index = models.PositiveIntegerField(null=True, blank=True)
    uuid = models.CharField(max_length=100, unique=True)
    name = models.CharField(max_length=200)
    simulated = models.BooleanField(default=False, help_text="Described by the fake backend, not a real GPU.")
    memory_total_mib = models.PositiveIntegerField(default=0)
    memory_used_mib = models.PositiveIntegerField(null=True, blank=True)
    utilization_pct = models.PositiveSmallIntegerField(null=True, blank=True)
    temperature_c = models.SmallIntegerField(
        null=True, blank=True, help_text="Where the backend gives it (NVML)."
    )
    power_w = models.PositiveIntegerField(
        null=True, blank=True, help_text="Power draw, where the backend gives it."
    )
    state = models.CharField(max_length=20, choices=State.choices, default=State.IDLE)
    state_reason = models.TextField(blank=True)
    # HOST_DOWN: marked by mark_host_lost (its host went quiet), until a refresh or an admin clears it.
    unavailable_cause = models.CharField(max_length=20, choices=Cause.choices, blank=True, default=Cause.NONE)
    # [{"pid", "name", "used_mib", "owner": "instance"|"foreign"|"orphan", "instance_id"}]
    processes = models.JSONField(default=list, blank=True)
    updated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["host__name", "index"]
        verbose_name = "GPU"
        constraints = [
            # One row answers to one index of a host (a replaced GPU's index is empty; NULLs are distinct).
            # Its index also serves the dashboard and load validation: the GPUs of a host in index order.
            models.UniqueConstraint(fields=["host", "index"], name="gpu_unique_host_index"),
        ]

    def __str__(self) -> str:
        return f"{self.host.name}:{'replaced' if self.index is None else self.index} {self.name}"

    @property
    def memory_percent(self) -> float | None:
        if self.memory_used_mib is None or not self.memory_total_mib:
            return None
        return round(self.memory_used_mib * 100 / self.memory_total_mib, 1)


class MemorySample(models.Model):
    """Time series of memory readings: one row per GPU per refresh, plus one per running instance
    (`instance_id` set; a plain id so that `gpus` does not depend on `models_app`)."""

    gpu = models.ForeignKey(Gpu, on_delete=models.CASCADE, related_name="samples", null=True, blank=True)
    instance_id = models.BigIntegerField(null=True, blank=True)
    taken_at = models.DateTimeField()
    used_mib = models.PositiveIntegerField(null=True, blank=True)
    total_mib = models.PositiveIntegerField(null=True, blank=True)

    class Meta:
        ordering = ["-taken_at"]
        indexes = [
            # Memory history of one GPU over a time window.
            models.Index(fields=["gpu", "taken_at"], name="sample_gpu_taken_idx"),
            # Memory history of one instance.
            models.Index(fields=["instance_id", "taken_at"], name="sample_instance_taken_idx"),
            # Retention: delete rows older than the cut-off in batches.
            models.Index(fields=["taken_at"], name="sample_taken_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.gpu_id}/{self.instance_id} {self.used_mib}/{self.total_mib} MiB at {self.taken_at}"


class AlertRule(models.Model):
    """A condition that raises an alert, edited by admins. What `threshold`, `hysteresis` and the minutes mean
    depends on the kind (see `KIND_HELP`); a rule is evaluated by every host's refresh cycle over that host's
    GPUs and instances, reading the latest rows and, for a leak, the samples of its window only."""

    class Kind(models.TextChoices):
        GPU_USED_PCT = "gpu_used_pct", "GPU memory used ≥ threshold % for for_minutes"
        INSTANCE_LEAK = "instance_leak", "Instance memory growing ≥ threshold MiB/h over window_minutes"
        GPU_HEADROOM = "gpu_headroom", "GPU memory within threshold MiB of its total"
        TELEMETRY_FAILING = "telemetry_failing", "GPU telemetry failing for for_minutes"
        FOREIGN_PROCESS = "foreign_process", "Foreign process on a GPU that serves one of our instances"
        INSTANCE_CRASHED = "instance_crashed", "Instance crashed"
        INSTANCE_EVICTED = "instance_evicted", "Instance evicted to make room for another model"

    class Severity(models.TextChoices):
        WARNING = "warning", "Warning"
        CRITICAL = "critical", "Critical"

    name = models.CharField(max_length=200, unique=True)
    kind = models.CharField(max_length=30, choices=Kind.choices)
    enabled = models.BooleanField(default=True)
    severity = models.CharField(max_length=10, choices=Severity.choices, default=Severity.WARNING)
    threshold = models.FloatField(
        default=0, help_text="gpu_used_pct: percent; instance_leak: MiB per hour; gpu_headroom: MiB free."
    )
    hysteresis = models.FloatField(
        default=0,
        help_text="How far back past the threshold the value must go before the alert resolves (same unit).",
    )
    for_minutes = models.PositiveIntegerField(
        default=0, help_text="The condition must hold this long before the alert fires."
    )
    window_minutes = models.PositiveIntegerField(
        default=60,
        help_text="instance_leak: the window whose samples give the slope; instance_crashed: how long the "
        "alert stays open after the crash.",
    )
    clear_minutes = models.PositiveIntegerField(
        default=1, help_text="The condition must stay clear this long before the alert resolves."
    )
    notify = models.BooleanField(
        default=True, help_text="Send webhooks and e-mail when it fires and resolves."
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["kind", "name"]

    def __str__(self) -> str:
        return self.name

    def clean(self):
        from django.core.exceptions import ValidationError

        if self.kind == self.Kind.GPU_USED_PCT and not 0 < self.threshold <= 100:
            raise ValidationError({"threshold": "A percent: more than 0, at most 100."})
        if self.kind in (self.Kind.INSTANCE_LEAK, self.Kind.GPU_HEADROOM) and self.threshold <= 0:
            raise ValidationError({"threshold": "Must be more than 0 (MiB per hour / MiB)."})
        if self.kind == self.Kind.INSTANCE_LEAK and self.window_minutes < 1:
            raise ValidationError({"window_minutes": "A leak needs a window of at least a minute."})


class Alert(models.Model):
    """One occurrence of a rule's condition on one subject (a GPU, an instance, a host). `pending` while the
    condition has not held for the rule's `for_minutes`; `open` once fired (notified once); `resolved` when
    the condition has been clear, past the hysteresis, for `clear_minutes`. At most one pending or open
    alert per rule and subject. `instance_id` is a plain id, like the samples'."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        OPEN = "open", "Open"
        RESOLVED = "resolved", "Resolved"

    rule = models.ForeignKey(AlertRule, on_delete=models.CASCADE, related_name="alerts")
    subject = models.CharField(max_length=100, help_text='"gpu:<id>", "instance:<id>" or "host:<id>".')
    host = models.ForeignKey(Host, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts")
    gpu = models.ForeignKey(Gpu, null=True, blank=True, on_delete=models.SET_NULL, related_name="alerts")
    instance_id = models.BigIntegerField(null=True, blank=True)
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    message = models.TextField(blank=True)
    value = models.FloatField(null=True, blank=True, help_text="The last value evaluated (rule's unit).")
    started_at = models.DateTimeField(help_text="When the condition was first seen.")
    fired_at = models.DateTimeField(null=True, blank=True)
    clear_since = models.DateTimeField(null=True, blank=True, help_text="Condition clear since (hysteresis).")
    resolved_at = models.DateTimeField(null=True, blank=True)
    acknowledged_at = models.DateTimeField(null=True, blank=True)
    acknowledged_by = models.CharField(max_length=150, blank=True)
    evaluated_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-started_at", "-id"]
        constraints = [
            # An alert fires once: one live (pending or open) alert per rule and subject, whoever evaluates.
            models.UniqueConstraint(
                fields=["rule", "subject"],
                condition=models.Q(status__in=["pending", "open"]),
                name="alert_one_live_per_rule_subject",
            ),
        ]
        indexes = [
            # Evaluation, banner and /metrics: the live alerts.
            models.Index(fields=["status", "started_at"], name="alert_status_started_idx"),
            # History graphs: the alerts of a GPU or an instance over a window.
            models.Index(fields=["gpu", "started_at"], name="alert_gpu_started_idx"),
            models.Index(fields=["instance_id", "started_at"], name="alert_instance_started_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.rule.name} on {self.subject} ({self.status})"
