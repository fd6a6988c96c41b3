from .models import GpuInstance, InstanceEvent

SYSTEM = "system"


def record(
    kind: str, *, instance: GpuInstance | None = None, actor=None, detail: str = "", reason: str = ""
) -> InstanceEvent:
    """Write one audit/timeline row. `actor` is a user, or None for the system; `reason`: the rule's code."""
    user = actor if actor is not None and getattr(actor, "is_authenticated", False) else None
    return InstanceEvent.objects.create(
        instance=instance,
        kind=kind,
        actor=user,
        actor_name=user.get_username() if user else SYSTEM,
        detail=detail,
        reason=reason,
    )


def record_account_event(sender, *, kind: str, actor=None, detail: str = "", **kwargs) -> None:
    """Receiver of accounts' audit signal: logins, tokens and user changes join the audit trail."""
    record(kind, actor=actor, detail=detail)
