"""The policy's entries in the one audit trail (models_app's InstanceEvent, through models_app.events): quota
changes, pins and reservations, with the actor and a sentence. Called inside the change's transaction."""

from models_app.events import record
from models_app.models import InstanceEvent

Kind = InstanceEvent.Kind


def quota_changed(actor, detail: str) -> None:
    record(Kind.QUOTA_CHANGED, actor=actor, detail=detail)


def pin_changed(actor, instance, detail: str) -> None:
    record(Kind.PIN_CHANGED, instance=instance, actor=actor, detail=detail)


def reservation_changed(actor, detail: str) -> None:
    record(Kind.RESERVATION_CHANGED, actor=actor, detail=detail)


def reservation_notice(instance, detail: str) -> None:
    """The owner is told (on the instance's timeline) that a reservation will unload it."""
    record(Kind.RESERVATION_NOTICE, instance=instance, actor=None, detail=detail)
