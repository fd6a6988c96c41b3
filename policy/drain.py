"""The drain before a reservation starts: others' models on its GPUs are told during the notice period and
unloaded at the start (the beat task policy.tasks.drain_reservations runs `drain` every minute). Calls
models_app's unload service, so admission never imports it (py is what admission asks)."""

import logging
from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone

from gpus.models import Host
from models_app import services
from models_app.errors import Refused
from models_app.models import GpuInstance, InstanceGpu

from . import audit, windows
from .models import DrainNotice, Pin, Reservation
from .reservations import fencing, is_holder, window_of

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Drain:
    """An instance of someone who does not hold `reservation`, on its GPUs: told now, unloaded when `due`
    (the window started). A pinned one is told, never unloaded (pins are never broken automatically)."""

    reservation: Reservation
    instance: GpuInstance
    due: bool
    pinned: bool
    sentence: str


def to_drain(now: datetime | None = None) -> list[Drain]:
    """Others' active instances on reserved GPUs, from the notice period before each window's start until its
    end: what must be unloaded, and the sentence to tell their owners."""
    now = now or timezone.now()
    found = []
    for host in Host.objects.filter(reservations__end__gt=now).distinct():
        for reservation in fencing(host, now):
            if not reservation.gpu_indices:
                continue  # a memory reservation drains nothing (windows.py)
            links = InstanceGpu.objects.filter(
                active=True, gpu__host=host, gpu__index__in=reservation.gpu_indices
            ).values_list("instance_id", flat=True)
            instances = (
                GpuInstance.objects.filter(pk__in=links, status__in=GpuInstance.ACTIVE_STATUSES)
                .select_related("owner", "model")
                .order_by("pk")
            )
            pinned = set(Pin.objects.filter(instance__in=instances).values_list("instance_id", flat=True))
            window = window_of(reservation)
            for instance in instances:
                if is_holder(reservation, instance.owner):
                    continue
                sentence = windows.drain_notice(window, instance.model_id, instance.pk)
                if instance.pk in pinned:
                    sentence += "; it is pinned, so it stays until an admin unpins it"
                found.append(
                    Drain(reservation, instance, now >= reservation.start, instance.pk in pinned, sentence)
                )
    return found


def drain(now: datetime | None = None) -> tuple[int, int]:
    """The beat task's work: tell each owner once (a reservation_notice event on the instance), unload what is
    due (an unload request whose event carries the sentence). Returns (told, unloaded). An unload refused now
    (host down, broker down) is tried again at the next run."""
    told = unloaded = 0
    for item in to_drain(now):
        notice, created = DrainNotice.objects.get_or_create(
            reservation=item.reservation, instance=item.instance
        )
        if created:
            audit.reservation_notice(item.instance, item.sentence)
            told += 1
        if not item.due or item.pinned or item.instance.status == GpuInstance.Status.STOPPING:
            continue
        try:
            services.request_unload(instance=item.instance, actor=None, detail=item.sentence)
        except Refused as exc:
            logger.warning("reservation #%s: instance #%s not unloaded yet: %s", item.reservation.pk,
                           item.instance.pk, exc.message)  # fmt: skip
            continue
        DrainNotice.objects.filter(pk=notice.pk).update(drained_at=timezone.now())
        unloaded += 1
    return told, unloaded
