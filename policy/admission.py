"""The policy's whole say on one load, for admission (models_app) to call in its transaction once the GPU rows
are locked. Order: a reservation that fences the GPUs (409) before the quota (429): a load that may not go
there at all is not a question of quota."""

from django.utils import timezone

from . import quotas, reservations


def check_load(
    user, *, host, gpus, model_id: str, claim_mib: int, needs_room: bool, at=None, fenced=None
) -> str:
    """Raise the PolicyRefusal that stops `user` (the requester; for a load on demand the user whose request
    caused it; None: nobody) from loading `model_id`, claiming `claim_mib` (summed), on `gpus` (Gpu rows of
    `host`); else answer the load's standing, "guaranteed" or "borrowed". `needs_room`: admission would have to
    unload something to fit it (a borrowed load may not). Memory reservations are admission's to subtract
    before it decides `needs_room`: `reservations.held_back_mib(user, host)`. `fenced`: the host's fencing
    reservations (`reservations.fencing(host, at)`) when the caller has read them already."""
    at = at or timezone.now()
    blocked = reservations.blocks(
        user, host, [g.index for g in gpus], model_id=model_id, at=at, fenced=fenced
    )
    if blocked is not None:
        raise blocked
    decision = quotas.decide(user, model_id=model_id, gpus=[g.pk for g in gpus], claim_mib=claim_mib)
    return decision.check(needs_room)
