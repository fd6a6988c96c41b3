"""The lease of the worker that loads, resumes or stops an instance: it keeps `lease_expires_at` in the future
while it works; reconcile treats an instance whose lease ran out as abandoned (its worker died) and converges it
at once."""

from datetime import timedelta

from django.conf import settings
from django.utils import timezone

from .models import GpuInstance

Status = GpuInstance.Status


def lease_seconds() -> float:
    """About one reconcile interval (2 s to 10 s): an abandoned start is noticed by the pass after next."""
    return float(max(2, min(settings.RECONCILE_SECONDS, 10)))


def lease_until(extra: float = 0.0):
    return timezone.now() + timedelta(seconds=lease_seconds() + extra)


def renew_lease(instance: GpuInstance, status: str = Status.STARTING) -> bool:
    """Push the lease forward while the instance is still in `status`; False when it left it."""
    until = lease_until()
    renewed = GpuInstance.objects.filter(pk=instance.pk, status=status).update(lease_expires_at=until)
    if renewed:
        instance.lease_expires_at = until
    return bool(renewed)


def lease_expired(instance: GpuInstance) -> bool | None:
    """True when a lease was held and ran out, False while one is held, None when there is none."""
    if instance.lease_expires_at is None:
        return None
    return instance.lease_expires_at <= timezone.now()
