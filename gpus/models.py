from django.db import models


class Host(models.Model):
    """A machine with GPUs and a Celery worker that consumes the queue `host.<name>`."""

    name = models.CharField(max_length=100, unique=True)
    telemetry_backend = models.CharField(max_length=20, blank=True, help_text="Backend the worker uses.")
    telemetry_error = models.TextField(blank=True, help_text="Why the last GPU query failed, if it did.")
    llama_server = models.CharField(max_length=500, blank=True, help_text="llama-server the worker resolved.")
    llama_server_error = models.TextField(blank=True)
    last_seen = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["name"]

    def __str__(self) -> str:
        return self.name

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
    state = models.CharField(max_length=20, choices=State.choices, default=State.IDLE)
    state_reason = models.TextField(blank=True)
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
