from django.conf import settings
from django.db import models
from django.db.models import Q
from django.utils import timezone

from gpus.models import Gpu, Host
from utilities.dbutil import select_one


class LlamaBinary(models.Model):
    """A llama-server build that a host's worker found in its own configuration (LLAMACONTROLLER_LLAMA_SERVER,
    PATH, the built one, LLAMACONTROLLER_LLAMA_SERVER_DIRS) and verified with `--version`. People choose
    among these; nobody types a path. `catalogue` is the binary's own `--help`, parsed: every spelling of
    every flag, whether it takes a value and whether that value is a file. Refreshed when the file changes."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="llama_binaries")
    name = models.CharField(max_length=100, help_text="A label, unique per host.")
    path = models.CharField(max_length=500)
    version = models.CharField(max_length=100, blank=True, help_text='e.g. "b6123".')
    version_text = models.TextField(blank=True, help_text="What --version printed.")
    is_default = models.BooleanField(
        default=False, help_text="The host's llama-server when a model pins none."
    )
    file_size = models.BigIntegerField(null=True, blank=True)
    file_mtime = models.FloatField(null=True, blank=True)
    catalogue = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True, help_text="Why it could not be verified, if it could not.")
    discovered_at = models.DateTimeField(default=timezone.now)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["host__name", "name"]
        verbose_name = "llama-server binary"
        verbose_name_plural = "llama-server binaries"
        constraints = [
            models.UniqueConstraint(fields=["host", "path"], name="binary_unique_host_path"),
            models.UniqueConstraint(fields=["host", "name"], name="binary_unique_host_name"),
        ]

    def __str__(self) -> str:
        return f"{self.name} on {self.host_id and self.host.name} ({self.version or 'unknown version'})"


class ModelConfig(models.Model):
    """The model registry: a GGUF file inside the allowed model folders, the llama-server flags to serve it
    with, and facts read from its GGUF header."""

    id = models.SlugField(max_length=100, primary_key=True)
    name = models.CharField(max_length=200)
    path = models.CharField(max_length=1000, help_text="GGUF file inside LLAMACONTROLLER_MODEL_DIRS.")
    binary = models.ForeignKey(
        LlamaBinary, null=True, blank=True, on_delete=models.PROTECT, help_text="Empty: the host's default."
    )
    # llama-server flags as data: {"c": 4096, "ngl": 99, "no-mmap": null, "lora": ["a.gguf", "b.gguf"]}
    cli_params = models.JSONField(default=dict, blank=True)
    metadata = models.JSONField(default=dict, blank=True, help_text="Free-form, from the registry file.")
    gguf_metadata = models.JSONField(default=dict, blank=True, help_text="Read from the GGUF header.")
    file_size_bytes = models.BigIntegerField(null=True, blank=True)
    restart_on_crash = models.BooleanField(default=False)
    max_restarts = models.PositiveSmallIntegerField(default=3)
    # The gateway (load on demand, idle unload): see models_app/ondemand.py and the README.
    on_demand = models.BooleanField(
        default=False,
        help_text="Anyone who may use models (any role) may wake it up through the gateway; "
        "without it only operators load it on demand.",
    )
    keep_alive_seconds = models.PositiveIntegerField(
        null=True,
        blank=True,
        help_text="Idle seconds before an unload. Empty: instances loaded on demand unload after "
        "LLAMACONTROLLER_KEEP_ALIVE_SECONDS and instances loaded by hand stay. A number: every instance of "
        "the model, however it was loaded, unloads after that long idle. 0: never unloaded for idleness.",
    )
    exclusive = models.BooleanField(
        default=False,
        help_text="It wants its GPUs to itself: it loads only onto GPUs no other model holds, and no other "
        "model joins it there.",
    )
    allow_anonymous = models.BooleanField(
        default=False,
        help_text="Requests without a token or session may use it through the gateway (and wake it up "
        "if it is on demand).",
    )
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["name"]
        verbose_name = "model"

    def __str__(self) -> str:
        return self.name


class GpuInstanceManager(models.Manager):
    def by_id(self, pk: int, *related: str) -> "GpuInstance | None":
        """The instance `pk` with the rows of its `related` foreign keys ("host", "model") attached, or None;
        as `select_related(*related).filter(pk=pk).first()` gives it, in one plain statement
        (utilities.dbutil.select_one: each column converted by its field). For the worker's first read of a
        load or an unload: met cold, the ORM took ~2 ms to build that statement (47 columns) that runs in
        ~0.4 ms."""
        return select_one(self.model, pk, related)

    def refresh(self, instance: "GpuInstance", *related: str) -> None:
        """`instance.refresh_from_db()` with the rows of `related` attached, read as `by_id` reads them (an
        unload request's read). GpuInstance.DoesNotExist when the row is gone."""
        fresh = self.by_id(instance.pk, *related)
        if fresh is None:
            raise self.model.DoesNotExist(f"instance #{instance.pk} no longer exists")
        for field in self.model._meta.concrete_fields:
            setattr(instance, field.attname, getattr(fresh, field.attname))
        for name in related:
            setattr(instance, name, getattr(fresh, name))


class GpuInstance(models.Model):
    """One llama-server process serving one model on one or more GPUs of one host, with the memory it
    was last measured to use."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        STARTING = "starting", "Starting"
        RUNNING = "running", "Running"
        STOPPING = "stopping", "Stopping"
        STOPPED = "stopped", "Stopped"
        CRASHED = "crashed", "Crashed"
        FAILED = "failed", "Failed"
        # Its host is down: the process may well be alive. Back to running when the host returns and finds
        # it, crashed when it does not.
        UNKNOWN = "unknown", "Unknown (host down)"

    class MemorySource(models.TextChoices):
        PROCESS = "process", "Measured per process"
        DEVICE = "device", "Whole-GPU figure"
        NONE = "none", "Unknown"

    ACTIVE_STATUSES = (Status.PENDING, Status.STARTING, Status.RUNNING, Status.STOPPING, Status.UNKNOWN)

    model = models.ForeignKey(ModelConfig, on_delete=models.PROTECT, related_name="instances")
    host = models.ForeignKey(Host, on_delete=models.PROTECT, related_name="instances")
    gpus = models.ManyToManyField(Gpu, through="InstanceGpu", related_name="instances")
    gpu_ids = models.CharField(
        max_length=100, help_text='As the original LlamaController\'s gpu_id: "0" or "0,1".'
    )
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING)
    owner = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="instances"
    )
    port = models.PositiveIntegerField(null=True, blank=True)
    pid = models.PositiveIntegerField(null=True, blank=True)
    process_create_time = models.FloatField(null=True, blank=True, help_text="psutil create_time of pid.")
    argv = models.JSONField(default=list, blank=True)
    log_path = models.CharField(max_length=1000, blank=True)
    requested_at = models.DateTimeField(default=timezone.now)
    loaded_at = models.DateTimeField(null=True, blank=True)
    stopped_at = models.DateTimeField(null=True, blank=True)
    exit_code = models.IntegerField(null=True, blank=True)
    error = models.TextField(blank=True)
    restart_count = models.PositiveSmallIntegerField(default=0)
    # The seed's memory snapshot (MiB), plus where the figure came from and when it was taken.
    memory_used_mb = models.PositiveIntegerField(null=True, blank=True)
    memory_total_mb = models.PositiveIntegerField(null=True, blank=True)
    memory_source = models.CharField(max_length=10, choices=MemorySource.choices, default=MemorySource.NONE)
    memory_updated_at = models.DateTimeField(null=True, blank=True)
    # The memory predicted when the load was asked for (MiB over its GPUs, corrected by earlier loads; the
    # breakdown per GPU, the formula's figure, the llama.cpp version and GPU name that calibration keys on),
    # what the post-load query measured, and the error: (measured - estimated) / estimated, in percent.
    memory_estimated_mb = models.PositiveIntegerField(null=True, blank=True)
    memory_estimate = models.JSONField(default=dict, blank=True)
    memory_measured_mb = models.PositiveIntegerField(
        null=True, blank=True, help_text="Measured right after the load (the estimate's check)."
    )
    memory_estimate_error_pct = models.FloatField(null=True, blank=True)
    # llama-server's --api-key: only the controller (health checks, the gateway) may call the instance.
    # Never shown in the UI or the API.
    api_key = models.CharField(max_length=64, blank=True, editable=False)
    # The worker watching a start renews this; past it, reconcile treats the start as abandoned.
    lease_expires_at = models.DateTimeField(null=True, blank=True)
    # The gateway: loaded by a request for the model rather than by hand (idle unload applies), requests
    # being answered now, the end of the last one, and the keep-alive a request asked for (clamped).
    loaded_on_demand = models.BooleanField(default=False)
    in_flight = models.PositiveIntegerField(default=0)
    last_used_at = models.DateTimeField(null=True, blank=True)
    keep_alive_seconds = models.PositiveIntegerField(
        null=True, blank=True, help_text="A request's keep_alive, within the admin's limit."
    )
    # Who asked for that keep_alive (a username, or "anonymous"): the idle unload's event names them.
    keep_alive_by = models.CharField(max_length=150, blank=True)
    # What a pending load waits for before it starts ("waiting for room: unloading gemma3-270m (#4) on GPU 0");
    # cleared when it starts.
    waiting_for = models.CharField(max_length=500, blank=True)

    objects = GpuInstanceManager()

    class Meta:
        ordering = ["-requested_at"]
        verbose_name = "GPU instance"
        constraints = [
            # Concurrent requests for a cold model share one load: at most one load on demand per model is
            # under way or running (one that is stopping may overlap with its successor).
            models.UniqueConstraint(
                fields=["model"],
                condition=Q(loaded_on_demand=True)
                & Q(status__in=["pending", "starting", "running", "unknown"]),
                name="instance_one_on_demand_per_model",
            ),
            # Two live instances on one host never share a port.
            models.UniqueConstraint(
                fields=["host", "port"],
                condition=Q(status__in=["pending", "starting", "running", "stopping", "unknown"])
                & Q(port__isnull=False),
                name="instance_unique_active_port",
            ),
        ]
        indexes = [
            # Dashboard, reconcile and refresh: the active instances (of a host).
            models.Index(fields=["host", "status"], name="instance_host_status_idx"),
            # Instance list, newest first.
            models.Index(fields=["requested_at"], name="instance_requested_idx"),
        ]

    def __str__(self) -> str:
        return (
            f"#{self.pk} {self.model_id} on {self.host_id and self.host.name}:{self.gpu_ids} ({self.status})"
        )

    @property
    def is_active(self) -> bool:
        return self.status in self.ACTIVE_STATUSES

    @property
    def memory_percent(self) -> float | None:
        if self.memory_source == self.MemorySource.NONE or self.memory_used_mb is None:
            return None
        if not self.memory_total_mb:
            return None
        return round(self.memory_used_mb * 100 / self.memory_total_mb, 1)

    @property
    def uptime_seconds(self) -> int | None:
        if self.status != self.Status.RUNNING or not self.loaded_at:
            return None
        return int((timezone.now() - self.loaded_at).total_seconds())


class HostModelFile(models.Model):
    """Whether a host's worker can serve a registered model: the file is at the registered path, inside the
    worker's allowed model folders, with the registered size. Each worker reports its own (at start, on every
    reconcile pass, and when the registry changes); loads, placement and the gateway only use hosts that
    reported `available`. No row yet: not checked, and the worker checks again at load."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="model_files")
    model = models.ForeignKey(ModelConfig, on_delete=models.CASCADE, related_name="host_files")
    available = models.BooleanField(default=False)
    reason = models.TextField(blank=True, help_text="Why the host cannot serve it, if it cannot.")
    size_bytes = models.BigIntegerField(null=True, blank=True)
    checked_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["host__name", "model_id"]
        verbose_name = "model file on a host"
        constraints = [models.UniqueConstraint(fields=["host", "model"], name="host_model_file_once")]

    def __str__(self) -> str:
        return (
            f"{self.model_id} on {self.host_id and self.host.name}: {'ok' if self.available else self.reason}"
        )


class HostGgufFile(models.Model):
    """A GGUF file that a host's worker found in its own model folders (its LLAMACONTROLLER_MODEL_DIRS), with
    the facts of its header: what the "Add a model" page lists per host, registered or not. Written by the
    host's worker only (models_app/folder_scan.py), at start, every LLAMACONTROLLER_MODEL_SCAN_SECONDS and on
    the page's Rescan; a file that vanished loses its row. `error`: the header could not be read (the file is
    listed as unreadable, with the reason). `facts` has read_gguf_facts' shape (saved as a registered model's
    gguf_metadata); `header` is the estimator's compact summary (models_app/estimator: tensors per block), so
    the web node predicts the memory of a file it cannot read itself."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="gguf_files")
    path = models.CharField(max_length=1000)
    size_bytes = models.BigIntegerField()
    modified_at = models.DateTimeField()
    architecture = models.CharField(max_length=100, blank=True)
    quantization = models.CharField(max_length=40, blank=True)
    parameter_count = models.BigIntegerField(null=True, blank=True)
    block_count = models.IntegerField(null=True, blank=True)
    context_length = models.IntegerField(null=True, blank=True)
    facts = models.JSONField(default=dict, blank=True)
    header = models.JSONField(default=dict, blank=True)
    error = models.TextField(blank=True, help_text="Why the header could not be read, if it could not.")
    seen_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["host__name", "path"]
        verbose_name = "GGUF file on a host"
        constraints = [models.UniqueConstraint(fields=["host", "path"], name="host_gguf_file_once")]

    def __str__(self) -> str:
        return f"{self.path} on {self.host_id and self.host.name}"


class HostFolderScan(models.Model):
    """A host's last scan of its model folders: when it was asked for and when it finished (the page polls
    until a Rescan lands), what the folders were there, and whether a bound cut it short."""

    host = models.OneToOneField(Host, on_delete=models.CASCADE, primary_key=True, related_name="folder_scan")
    folders = models.JSONField(default=list, blank=True)
    requested_at = models.DateTimeField(null=True, blank=True)
    scanned_at = models.DateTimeField(null=True, blank=True)
    duration_ms = models.FloatField(null=True, blank=True)
    files = models.IntegerField(default=0)
    note = models.TextField(
        blank=True, help_text="A bound that cut the scan short, folders it could not read."
    )

    class Meta:
        verbose_name = "model folder scan"

    def __str__(self) -> str:
        return f"scan of {self.host_id and self.host.name}"

    @property
    def pending(self) -> bool:
        """A scan was asked for and has not finished since."""
        return self.requested_at is not None and (
            self.scanned_at is None or self.scanned_at < self.requested_at
        )


class InstanceGpu(models.Model):
    """An instance's hold on one GPU, in order; `active` mirrors the instance being active. Several active
    instances may hold one GPU: admission (models_app/admission.py) admits them by memory."""

    instance = models.ForeignKey(GpuInstance, on_delete=models.CASCADE, related_name="gpu_links")
    gpu = models.ForeignKey(Gpu, on_delete=models.PROTECT, related_name="instance_links")
    position = models.PositiveSmallIntegerField()
    active = models.BooleanField(default=True)

    class Meta:
        ordering = ["instance", "position"]
        verbose_name = "GPU claim"
        constraints = [
            models.UniqueConstraint(fields=["instance", "gpu"], name="instance_gpu_once"),
        ]

    def __str__(self) -> str:
        return f"{self.instance_id} -> {self.gpu_id} ({'active' if self.active else 'released'})"


class InstanceEvent(models.Model):
    """Audit trail and timeline: who asked for what, when, and what happened. Events that concern no
    instance (login failures, token changes) have `instance` empty."""

    class Kind(models.TextChoices):
        REQUESTED = "requested", "Load requested"
        STARTED = "started", "Process started"
        HEALTHY = "healthy", "Healthy (running)"
        MEMORY = "memory", "Memory measured"
        ESTIMATE = "estimate", "Estimate checked"
        FAILED = "failed", "Failed"
        CRASHED = "crashed", "Crashed"
        RESTARTING = "restarting", "Restarting"
        UNLOAD_REQUESTED = "unload_requested", "Unload requested"
        UNLOADED = "unloaded", "Unloaded"
        SWITCH_REQUESTED = "switch_requested", "Switch requested"
        ADOPTED = "adopted", "Adopted"
        KILLED = "killed", "Killed"
        ORPHAN_KILLED = "orphan_killed", "Orphan process killed"
        LOGIN_FAILED = "login_failed", "Login failed"
        LOGIN_LOCKED = "login_locked", "Account locked"
        TOKEN_CREATED = "token_created", "API token created"
        TOKEN_REVOKED = "token_revoked", "API token revoked"
        REGISTRY_CHANGED = "registry_changed", "Model registry changed"
        TOKEN_CHANGED = "token_changed", "API token changed"
        USER_CHANGED = "user_changed", "User changed"
        INSTANCE_DELETED = "instance_deleted", "Instance record deleted"
        HOST_LOST = "host_lost", "Host did not answer"
        # Read back by code (never by the wording of `detail`): resend limits, once-per-silence GPU marks,
        # the dashboard's idle unloads.
        RESENT = "resent", "Sent again"
        IDLE_UNLOAD = "idle_unload", "Idle unload requested"
        HOST_GPUS_MARKED = "host_gpus_marked", "Host's GPUs marked unavailable"
        HOST_RETURNED = "host_returned", "Host answered again"
        # Unloaded to make room for another load (models_app/room.py); `reason` says which rule chose it.
        EVICTED = "evicted", "Evicted to make room"
        ALERT_FIRED = "alert_fired", "Alert fired"
        ALERT_RESOLVED = "alert_resolved", "Alert resolved"
        # Team policy (the policy app): quota edits, pins, reservations and their drain notices.
        QUOTA_CHANGED = "quota_changed", "Quota changed"
        PIN_CHANGED = "pin_changed", "Pin changed"
        RESERVATION_CHANGED = "reservation_changed", "Reservation changed"
        RESERVATION_NOTICE = "reservation_notice", "Reservation notice"

    # SET_NULL: deleting a finished instance's record never deletes its part of the audit trail.
    instance = models.ForeignKey(
        GpuInstance, null=True, blank=True, on_delete=models.SET_NULL, related_name="events"
    )
    kind = models.CharField(max_length=20, choices=Kind.choices)
    actor = models.ForeignKey(settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL)
    actor_name = models.CharField(max_length=150, help_text='Username at the time, or "system".')
    detail = models.TextField(blank=True)
    # Machine-readable why, where a rule decided (an eviction's "idle_lru"); empty otherwise.
    reason = models.CharField(max_length=40, blank=True)
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # An instance's timeline.
            models.Index(fields=["instance", "created_at"], name="event_instance_created_idx"),
            # The audit list, newest first, filterable by time.
            models.Index(fields=["created_at"], name="event_created_idx"),
            # Audit by user.
            models.Index(fields=["actor", "created_at"], name="event_actor_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor_name} {self.kind} #{self.instance_id}"
