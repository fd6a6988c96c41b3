"""Pins against the database: an admin pins an active instance (never unloaded automatically) or unpins it;
eviction and the idle unload ask `pinned_instance_ids()`, and a load that only unpinned room would serve is
refused with `no_room` (pinned_no_room, 503)."""

from collections.abc import Iterable

from django.db import IntegrityError, transaction

from models_app.errors import Refused
from models_app.models import GpuInstance

from . import audit, rules
from .models import Pin
from .reasons import PolicyRefusal


class PinRefused(Refused):
    """A pin that cannot be made: the instance is not loaded ("invalid", 400) or already pinned ("busy", 409)."""


def pinned_instance_ids() -> set[int]:
    """The active instances that are pinned: eviction and the idle unload must leave them alone."""
    return set(
        Pin.objects.filter(instance__status__in=GpuInstance.ACTIVE_STATUSES).values_list(
            "instance_id", flat=True
        )
    )


def pinned_by_names() -> dict[int, str]:
    """The active pinned instances -> who pinned them (their username, or "an admin"), for the dashboard."""
    rows = Pin.objects.filter(instance__status__in=GpuInstance.ACTIVE_STATUSES).values_list(
        "instance_id", "pinned_by__username"
    )
    return {instance_id: name or "an admin" for instance_id, name in rows}


def pin(instance: GpuInstance, *, actor, reason: str = "") -> Pin:
    if not instance.is_active:
        raise PinRefused(
            f"instance #{instance.pk} is not loaded (it is {instance.status}): nothing to pin", code="invalid"
        )
    try:
        with transaction.atomic():
            made = Pin.objects.create(instance=instance, pinned_by=actor, reason=reason)
            why = f": {reason}" if reason else ""
            audit.pin_changed(actor, instance, f"{instance.model_id} (#{instance.pk}) pinned{why}")
    except IntegrityError:
        raise PinRefused(f"instance #{instance.pk} is already pinned", code="busy") from None
    return made


def unpin(pinned: Pin, *, actor) -> None:
    with transaction.atomic():
        instance = pinned.instance
        audit.pin_changed(actor, instance, f"{instance.model_id} (#{instance.pk}) unpinned")
        pinned.delete()


def no_room(model_id: str, where: str, instance_ids: Iterable[int]) -> PolicyRefusal:
    """The pinned_no_room refusal for a load of `model_id` on `where` ("GPU 0 of box-1") when only unloading
    the pinned `instance_ids` would make room."""
    pins = Pin.objects.filter(instance_id__in=list(instance_ids)).select_related("instance", "pinned_by")
    holders = [
        rules.PinnedHolder(
            p.instance_id,
            p.instance.model_id,
            p.pinned_by.get_username() if p.pinned_by else "someone",
            p.reason,
        )
        for p in pins
    ]
    return rules.pinned_no_room(model_id, where, holders)
