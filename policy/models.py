from django.conf import settings
from django.contrib.auth.models import Group
from django.core.validators import MinValueValidator
from django.db import models
from django.db.models import F, Q
from django.utils import timezone

from gpus.models import Host
from models_app.models import GpuInstance, ModelConfig


class Quota(models.Model):
    """What a user, or every member of a Django group, may hold: GPU memory claimed (MiB), GPUs held, models
    loaded, each optional (empty: no limit), and optionally the only models they may load. Checked at
    admission (policy.quotas); within it a load is guaranteed, beyond it borrowed (or refused when `hard`).
    Changing a quota never unloads anything."""

    user = models.OneToOneField(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.CASCADE, related_name="quota"
    )
    group = models.OneToOneField(Group, null=True, blank=True, on_delete=models.CASCADE, related_name="quota")
    gpu_memory_mib = models.PositiveIntegerField(
        null=True,
        blank=True,
        validators=[MinValueValidator(1)],
        help_text="GPU memory claimed, MiB. Empty: no limit.",
    )
    gpus = models.PositiveSmallIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="GPUs held. Empty: no limit."
    )
    models_loaded = models.PositiveSmallIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="Models loaded. Empty: no limit."
    )
    allowed_models = models.ManyToManyField(
        ModelConfig,
        blank=True,
        related_name="+",
        help_text="The only models they may load. Empty: any model.",
    )
    hard = models.BooleanField(
        default=False,
        help_text="Nothing beyond the quota, not even on free memory (otherwise such loads run borrowed).",
    )
    note = models.CharField(max_length=200, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        ordering = ["group__name", "user__username"]
        constraints = [
            models.CheckConstraint(
                condition=Q(user__isnull=True, group__isnull=False)
                | Q(user__isnull=False, group__isnull=True),
                name="quota_user_or_group",
            ),
        ]

    def __str__(self) -> str:
        return f"quota of {self.holder_label()}"

    def holder_label(self) -> str:
        if self.user_id:
            return f"user {self.user.get_username()}"
        return f"group {self.group.name}" if self.group_id else "nobody"


class Reservation(models.Model):
    """A time window on given GPUs of a host (or an amount of its memory) for users and/or groups, with a
    purpose. From `notice_minutes` before the start until the end only the holders load there; others'
    models on the GPUs are told at the notice and unloaded at the start (policy.tasks.drain_reservations).
    Overlapping windows on a shared GPU, or more memory than the host has, are refused at creation."""

    host = models.ForeignKey(Host, on_delete=models.CASCADE, related_name="reservations")
    gpu_indices = models.JSONField(
        default=list, blank=True, help_text="GPU indices, e.g. [0, 1]. Empty: memory_mib."
    )
    memory_mib = models.PositiveIntegerField(
        null=True, blank=True, validators=[MinValueValidator(1)], help_text="An amount of the host's memory."
    )
    start = models.DateTimeField()
    end = models.DateTimeField()
    users = models.ManyToManyField(settings.AUTH_USER_MODEL, blank=True, related_name="reservations")
    groups = models.ManyToManyField(Group, blank=True, related_name="reservations")
    purpose = models.CharField(max_length=200)
    notice_minutes = models.PositiveIntegerField(
        default=30, help_text="Others' models on the GPUs are told this long before the start, then unloaded."
    )
    created_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        ordering = ["start", "id"]
        constraints = [
            models.CheckConstraint(condition=Q(end__gt=F("start")), name="reservation_ends_after_start")
        ]
        indexes = [
            # Admission, the drain and the week view: a host's windows that end after now.
            models.Index(fields=["host", "end"], name="reservation_host_end_idx"),
        ]

    def __str__(self) -> str:
        return f"#{self.pk} {self.purpose} on {self.host_id and self.host.name}"


class Pin(models.Model):
    """An instance an admin pinned: never unloaded automatically (no idle unload, no eviction). When only
    unloading it would make room, the load is refused (pinned_no_room). It counts against the owner's quota
    like any claim. (A boolean on GpuInstance could replace this table; it lives here so the policy app owns
    it.) The pin ends with the instance: a stopped instance's pin is ignored."""

    instance = models.OneToOneField(GpuInstance, on_delete=models.CASCADE, related_name="pin")
    pinned_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    pinned_at = models.DateTimeField(default=timezone.now)
    reason = models.CharField(max_length=200, blank=True)

    class Meta:
        ordering = ["-pinned_at", "-id"]

    def __str__(self) -> str:
        return f"pin on instance #{self.instance_id}"


class DrainNotice(models.Model):
    """An owner told that a reservation will unload their instance (once per reservation and instance), and
    when it was unloaded for it."""

    reservation = models.ForeignKey(Reservation, on_delete=models.CASCADE, related_name="notices")
    instance = models.ForeignKey(GpuInstance, on_delete=models.CASCADE, related_name="+")
    noticed_at = models.DateTimeField(default=timezone.now)
    drained_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["-noticed_at"]
        constraints = [
            models.UniqueConstraint(fields=["reservation", "instance"], name="drain_notice_once"),
        ]

    def __str__(self) -> str:
        return f"notice of reservation #{self.reservation_id} to instance #{self.instance_id}"
