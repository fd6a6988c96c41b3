from django.conf import settings
from django.db import models
from django.utils import timezone


class UsageRecord(models.Model):
    """One inference request through the gateway, written once when it ends (answered, refused after
    authentication, failed or abandoned by its client): who, which model and instance, how it went and what
    it cost. Pruned after LLAMACONTROLLER_USAGE_RETENTION_DAYS. Plain ids for the model and the instance:
    the record outlives both."""

    # No index of its own: usage_user_created_idx (user, created_at) serves every lookup by user (a user's
    # deletion setting it NULL too), and one index fewer is one B-tree fewer written by every request.
    user = models.ForeignKey(
        settings.AUTH_USER_MODEL,
        null=True,
        blank=True,
        on_delete=models.SET_NULL,
        related_name="+",
        db_index=False,
    )
    token = models.ForeignKey(
        "accounts.ApiToken", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    model_id = models.CharField(max_length=200, help_text="The model name as asked, without :latest.")
    instance_id = models.PositiveBigIntegerField(null=True, blank=True)
    endpoint = models.CharField(max_length=40, help_text='e.g. "/api/chat", "/v1/chat/completions".')
    status = models.PositiveSmallIntegerField(help_text="HTTP status answered (200 even if a stream failed).")
    error = models.TextField(blank=True, help_text="What went wrong, if anything did.")
    prompt_tokens = models.PositiveIntegerField(null=True, blank=True)
    completion_tokens = models.PositiveIntegerField(null=True, blank=True)
    time_to_first_token_ms = models.FloatField(null=True, blank=True)
    duration_ms = models.FloatField()
    client_disconnected = models.BooleanField(default=False)
    throttled = models.CharField(
        max_length=30,
        blank=True,
        default="",
        help_text="Why fair use held the request back (its status is 429 or 503): queue_full, queue_timeout, "
        "requests_per_minute or tokens_per_minute; empty when it did not.",
    )
    created_at = models.DateTimeField(default=timezone.now, help_text="When the request arrived.")

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [
            # Pruning by age, and the usage page's and API's time window over everyone (admins).
            models.Index(fields=["created_at"], name="usage_created_idx"),
            # "My usage": a user's requests in a time window (the page and the API for non-admins).
            models.Index(fields=["user", "created_at"], name="usage_user_created_idx"),
            # Per-model figures and the ?model= filter.
            models.Index(fields=["model_id", "created_at"], name="usage_model_created_idx"),
        ]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.endpoint} {self.model_id} {self.status}"

    @property
    def tokens_per_second(self) -> float | None:
        """Completion tokens over the time after the first token (the generation speed)."""
        if not self.completion_tokens or self.time_to_first_token_ms is None:
            return None
        generating = (self.duration_ms - self.time_to_first_token_ms) / 1000
        return round(self.completion_tokens / generating, 1) if generating > 0 else None
