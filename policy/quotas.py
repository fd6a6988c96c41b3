"""Quotas against the database: the quota that applies to a user, the claims they hold, the decision for a new
load (admission calls `decide`), who holds borrowed memory (eviction reclaims it first), a user's use against
their quota (`GET /api/v1/quota/`, the dashboard), and quota changes with their audit event. The rules
themselves are in rules.py (plain Python)."""

from collections.abc import Callable, Iterable

from django.contrib.auth import get_user_model
from django.db import transaction
from django.db.models import Prefetch, Q

from models_app.models import GpuInstance, InstanceGpu

from . import audit, rules
from .models import Quota
from .reasons import mib


def limits_of(quota: Quota) -> rules.Limits:
    """A Quota row as the rules read it (`allowed_models` prefetched or read here)."""
    allowed = frozenset(m.pk for m in quota.allowed_models.all())
    return rules.Limits(
        gpu_memory_mib=quota.gpu_memory_mib,
        gpus=quota.gpus,
        models_loaded=quota.models_loaded,
        allowed_models=allowed or None,
        hard=quota.hard,
        source="your own quota" if quota.user_id else f"group {quota.group.name}'s quota",
    )


def _quotas():
    return Quota.objects.select_related("user", "group").prefetch_related("allowed_models")


def limits_for(user) -> rules.Limits:
    """The quota that applies to `user` (rules.combine): their own, else their groups' most generous; no user
    or no quota: unlimited."""
    if user is None or not getattr(user, "is_authenticated", False):
        return rules.UNLIMITED
    # One query for the user's own quota and their groups' (a user's own quota, when set, is the whole say).
    rows = list(_quotas().filter(Q(user=user) | Q(group__user=user)))
    if any(q.user_id == user.pk for q in rows):
        rows = [q for q in rows if q.user_id == user.pk]
    own = next((limits_of(q) for q in rows if q.user_id), None)
    return rules.combine(own, [limits_of(q) for q in rows if q.group_id])


def instance_claim_mib(instance: GpuInstance) -> int:
    """An instance's claim summed over its GPUs, until admission's own claim (issue 19) replaces it: the
    larger of its estimate and its measured memory."""
    return max(instance.memory_estimated_mb or 0, instance.memory_used_mb or 0)


ClaimOf = Callable[[GpuInstance], int]


def _active_with_gpus():
    # A stopping instance is on its way out (an unload, a switch replacing it, an eviction): it no longer counts
    # against its owner's quota, so a switch trades one model for another within it.
    links = Prefetch("gpu_links", queryset=InstanceGpu.objects.filter(active=True).order_by("position"))
    held = [s for s in GpuInstance.ACTIVE_STATUSES if s != GpuInstance.Status.STOPPING]
    return GpuInstance.objects.filter(status__in=held).prefetch_related(links)


def as_claim(instance: GpuInstance, claim_of: ClaimOf = instance_claim_mib) -> rules.Claim:
    return rules.Claim(
        instance_id=instance.pk,
        model_id=instance.model_id,
        gpus=tuple(link.gpu_id for link in instance.gpu_links.all()),
        claim_mib=claim_of(instance),
    )


def claims_of(user, claim_of: ClaimOf = instance_claim_mib) -> list[rules.Claim]:
    """The user's active claims in admission order. `claim_of`: an instance's claim in MiB."""
    if user is None or not getattr(user, "is_authenticated", False):
        return []
    return [as_claim(i, claim_of) for i in _active_with_gpus().filter(owner=user).order_by("pk")]


def decide(user, *, model_id: str, gpus: Iterable, claim_mib: int, claim_of: ClaimOf = instance_claim_mib):
    """Admission's question, for a load of `model_id` claiming `claim_mib` (summed) on `gpus` (Gpu ids) for
    `user` (the requester; for a load on demand, the user whose request caused it; None: nobody's quota).
    Returns a rules.Decision: `decision.check(needs_room)` answers the standing to record ("guaranteed" or
    "borrowed") or raises the PolicyRefusal (429). Call it inside the admission transaction, after the GPUs
    are locked, so two loads of one user cannot both slip under the quota."""
    new = rules.Claim(instance_id=None, model_id=model_id, gpus=tuple(gpus), claim_mib=int(claim_mib))
    limits = limits_for(user)
    if limits.unlimited:  # every load is guaranteed whatever the user holds: not read
        return rules.decide(limits, [], new)
    return rules.decide(limits, claims_of(user, claim_of), new)


def standings(claim_of: ClaimOf = instance_claim_mib) -> dict[int, str]:
    """instance id -> "guaranteed" or "borrowed" for every active instance (no owner: guaranteed). A few
    queries whatever the number of instances."""
    by_owner: dict[int | None, list[GpuInstance]] = {}
    for instance in _active_with_gpus().order_by("pk"):
        by_owner.setdefault(instance.owner_id, []).append(instance)
    result = {i.pk: rules.GUARANTEED for i in by_owner.pop(None, [])}
    if not by_owner:
        return result
    owners = get_user_model().objects.filter(pk__in=by_owner).prefetch_related("groups")
    quotas = list(_quotas().filter(user__in=owners)) + list(
        _quotas().filter(group__user__in=owners).distinct()
    )
    own = {q.user_id: limits_of(q) for q in quotas if q.user_id}
    by_group = {q.group_id: limits_of(q) for q in quotas if q.group_id}
    for owner in owners:
        groups = [by_group[g.pk] for g in owner.groups.all() if g.pk in by_group]
        limits = rules.combine(own.get(owner.pk), groups)
        result.update(rules.standings(limits, [as_claim(i, claim_of) for i in by_owner[owner.pk]]))
    return result


def borrowed_instance_ids(claim_of: ClaimOf = instance_claim_mib) -> set[int]:
    """For eviction: the instances holding borrowed memory, reclaimed first when a guaranteed load needs room
    (never with a request in flight: eviction's own rule)."""
    return {pk for pk, standing in standings(claim_of).items() if standing == rules.BORROWED}


def usage(user, claim_of: ClaimOf = instance_claim_mib) -> dict:
    """A user's use against their quota: the limits (None: none), what they hold, and each instance with its
    standing. The shape of `GET /api/v1/quota/`."""
    limits = limits_for(user)
    claims = claims_of(user, claim_of)
    held = rules.usage_of(claims)
    marks = rules.standings(limits, claims)
    return {
        "user": user.get_username(),
        "source": limits.source,
        "hard": limits.hard,
        "limits": {
            "gpu_memory_mib": limits.gpu_memory_mib,
            "gpus": limits.gpus,
            "models_loaded": limits.models_loaded,
        },
        "allowed_models": None if limits.allowed_models is None else sorted(limits.allowed_models),
        "used": {
            "gpu_memory_mib": held.gpu_memory_mib,
            "gpus": held.gpus,
            "models_loaded": held.models_loaded,
        },
        "instances": [
            {
                "id": c.instance_id,
                "model": c.model_id,
                "gpus": list(c.gpus),
                "claim_mib": c.claim_mib,
                "standing": marks[c.instance_id],
            }
            for c in claims
        ],
    }


# --- changes (the API and the admin) -----------------------------------------------------------------


def describe(quota: Quota) -> str:
    """`gpu memory 65 536 MiB, GPUs 2, models any, allowed any` (for the audit trail)."""

    def limit(value, unit=""):
        return "no limit" if value is None else f"{value}{unit}"

    allowed = ", ".join(sorted(m.pk for m in quota.allowed_models.all())) or "any"
    memory = "no limit" if quota.gpu_memory_mib is None else mib(quota.gpu_memory_mib)
    return (
        f"GPU memory {memory}, GPUs {limit(quota.gpus)}, models loaded {limit(quota.models_loaded)}, "
        f"allowed models {allowed}{', hard' if quota.hard else ''}"
    )


def record_saved(quota: Quota, actor, before: str | None) -> None:
    """After a quota was created or changed (its allowed models included): the audit event."""
    now = describe(quota)
    if before == now:
        return
    change = f"was {before}; now {now}" if before is not None else f"set: {now}"
    audit.quota_changed(actor, f"quota of {quota.holder_label()} {change} (nothing running is unloaded)")


def delete(quota: Quota, actor) -> None:
    with transaction.atomic():
        audit.quota_changed(actor, f"quota of {quota.holder_label()} removed (was {describe(quota)})")
        quota.delete()
