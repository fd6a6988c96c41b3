from django.utils import timezone

from utilities.dbutil import insert

from .models import GpuInstance, InstanceEvent

SYSTEM = "system"


def record(
    kind: str, *, instance: GpuInstance | None = None, actor=None, detail: str = "", reason: str = ""
) -> None:
    """Write one audit/timeline row. `actor` is a user, or None for the system; `reason`: the rule's code.
    One plain INSERT (utilities.dbutil.insert): every status transition writes one, on the way of each load
    and unload."""
    user = actor if actor is not None and getattr(actor, "is_authenticated", False) else None
    insert(
        InstanceEvent,
        {
            "instance_id": instance.pk if instance is not None else None,
            "kind": kind,
            "actor_id": user.pk if user else None,
            "actor_name": user.get_username() if user else SYSTEM,
            "detail": detail,
            "reason": reason,
            "created_at": timezone.now(),
        },
    )


def record_account_event(sender, *, kind: str, actor=None, detail: str = "", **kwargs) -> None:
    """Receiver of accounts' audit signal: logins, tokens and user changes join the audit trail."""
    record(kind, actor=actor, detail=detail)
