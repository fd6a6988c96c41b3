"""Quotas as plain Python (no Django, no database): what a user may hold, and whether a new claim is within it.

The rules (README "Team policy"):
- A user's quota: their own when an admin set one; otherwise, resource by resource, the most generous of the
  quotas of their Django groups (a group quota that leaves a resource empty leaves it unlimited; several
  allowed-model lists add up; the limits are hard only when every group quota is). No quota anywhere, or no
  user at all (a system restart, an anonymous request for a model that allows it): unlimited.
- A user's claims count in the order they were admitted (instance ids): each claim is **guaranteed** while
  the claims up to and including it stay within every limit, **borrowed** from the first one that goes
  beyond. Borrowed and guaranteed claims both count (a borrowed model holds memory too). So when a guaranteed
  model is unloaded, the next ones move up within the quota; changing a quota unloads nothing, it only moves
  the line between guaranteed and borrowed.
- A new claim beyond the quota is borrowed: admission runs it only on free memory (it evicts nobody) and
  refuses it with the quota's reason when it would need room made; the borrowed are reclaimed first when a
  guaranteed load needs room. Where the quota is `hard`, beyond it is refused outright. A model outside the
  quota's allowed list is refused whatever the memory (quota_model_not_allowed).
- Pins count against the owner's quota like any claim."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .reasons import PolicyRefusal, mib

GUARANTEED = "guaranteed"
BORROWED = "borrowed"


@dataclass(frozen=True)
class Claim:
    """An instance's hold on GPU memory as quotas see it. `gpus`: the keys of the GPUs it holds memory on
    (the Gpu ids); `claim_mib`: its claim summed over them. `instance_id` None: the load being decided."""

    instance_id: int | None
    model_id: str
    gpus: tuple
    claim_mib: int


@dataclass(frozen=True)
class Limits:
    """A quota. None: no limit on that resource (`allowed_models` None: any model). `hard`: nothing beyond
    it, not even on free memory. `source`: whose quota it is, for sentences ("your own quota")."""

    gpu_memory_mib: int | None = None
    gpus: int | None = None
    models_loaded: int | None = None
    allowed_models: frozenset | None = None
    hard: bool = False
    source: str = ""

    @property
    def unlimited(self) -> bool:
        return (
            self.gpu_memory_mib is None
            and self.gpus is None
            and self.models_loaded is None
            and (self.allowed_models is None)
        )


UNLIMITED = Limits(source="no quota")


def _generous(values: list):
    return None if any(v is None for v in values) else max(values)


def combine(own: Limits | None, groups: Sequence[Limits]) -> Limits:
    """The quota that applies: the user's own when set, else the most generous of their groups', resource by
    resource; neither: UNLIMITED."""
    if own is not None:
        return own
    if not groups:
        return UNLIMITED
    allowed = [g.allowed_models for g in groups]
    return Limits(
        gpu_memory_mib=_generous([g.gpu_memory_mib for g in groups]),
        gpus=_generous([g.gpus for g in groups]),
        models_loaded=_generous([g.models_loaded for g in groups]),
        allowed_models=None if any(a is None for a in allowed) else frozenset().union(*allowed),
        hard=all(g.hard for g in groups),
        source=" / ".join(g.source for g in groups),
    )


@dataclass(frozen=True)
class Usage:
    """What a set of claims holds: MiB summed, distinct GPUs, instances."""

    gpu_memory_mib: int
    gpus: int
    models_loaded: int


def usage_of(claims: Iterable[Claim]) -> Usage:
    claims = list(claims)
    return Usage(
        gpu_memory_mib=sum(c.claim_mib for c in claims),
        gpus=len({g for c in claims for g in c.gpus}),
        models_loaded=len(claims),
    )


def beyond(limits: Limits, held: Sequence[Claim], new: Claim) -> PolicyRefusal | None:
    """The first limit that `held` plus `new` goes beyond, as a refusal with the numbers; None when within.
    Memory first, then GPUs, then models (the allowed list is checked by `decide`)."""
    before = usage_of(held)
    after = usage_of([*held, new])
    where = f" ({limits.source})" if limits.source else ""
    if limits.gpu_memory_mib is not None and after.gpu_memory_mib > limits.gpu_memory_mib:
        return PolicyRefusal(
            "quota_gpu_memory",
            f"you hold {mib(before.gpu_memory_mib)} of your {mib(limits.gpu_memory_mib)}{where}; "
            f"{new.model_id} needs ≈ {mib(new.claim_mib)}",
        )
    if limits.gpus is not None and after.gpus > limits.gpus:
        added = after.gpus - before.gpus
        return PolicyRefusal(
            "quota_gpus",
            f"you hold {before.gpus} of your {limits.gpus} GPU(s){where}; "
            f"{new.model_id} would add {added} more",
        )
    if limits.models_loaded is not None and after.models_loaded > limits.models_loaded:
        return PolicyRefusal(
            "quota_models",
            f"you have {before.models_loaded} of your {limits.models_loaded} model(s) loaded{where}; "
            f"{new.model_id} would be one more",
        )
    return None


def not_allowed(limits: Limits, model_id: str) -> PolicyRefusal | None:
    if limits.allowed_models is None or model_id in limits.allowed_models:
        return None
    listed = ", ".join(sorted(limits.allowed_models)) or "none"
    where = f" ({limits.source})" if limits.source else ""
    return PolicyRefusal(
        "quota_model_not_allowed", f"{model_id} is not among the models your quota allows{where}: {listed}"
    )


@dataclass(frozen=True)
class Decision:
    """What the quota says of a new claim: `standing` GUARANTEED or BORROWED; `refusal` is set when it is
    borrowed (why: raise it when the load would need room made) and is the answer when `refused`."""

    standing: str
    refusal: PolicyRefusal | None = None
    refused: bool = False

    def check(self, needs_room: bool) -> str:
        """For admission, once it knows whether the load fits on free memory: the standing to record, or the
        refusal raised (refused outright, or borrowed where room would have to be made)."""
        if self.refused or (self.standing == BORROWED and needs_room):
            raise self.refusal
        return self.standing


def decide(limits: Limits, held: Sequence[Claim], new: Claim) -> Decision:
    """Guaranteed within the quota; borrowed beyond it (refused where the quota is hard); refused for a model
    the quota does not allow. `held`: the user's active claims."""
    refusal = not_allowed(limits, new.model_id)
    if refusal is not None:
        return Decision(BORROWED, refusal, refused=True)
    refusal = beyond(limits, held, new)
    if refusal is None:
        return Decision(GUARANTEED)
    return Decision(BORROWED, refusal, refused=limits.hard)


def standings(limits: Limits, claims: Sequence[Claim]) -> dict:
    """instance id -> GUARANTEED or BORROWED for a user's claims, counted in the order given (admission order):
    guaranteed while the claims so far stay within the quota and the model is allowed."""
    result = {}
    for position, claim in enumerate(claims):
        fits = (
            not_allowed(limits, claim.model_id) is None and beyond(limits, claims[:position], claim) is None
        )
        result[claim.instance_id] = GUARANTEED if fits else BORROWED
    return result


# --- pins --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PinnedHolder:
    """A pinned instance that stands in a load's way."""

    instance_id: int
    model_id: str
    pinned_by: str
    reason: str = ""


def pinned_no_room(model_id: str, where: str, pinned: Sequence[PinnedHolder]) -> PolicyRefusal:
    """The refusal when only unloading pinned models would make room for `model_id` on `where` ("GPU 0 of
    box-1"): pins are never broken."""
    named = "; ".join(
        f"{p.model_id} (#{p.instance_id}, pinned by {p.pinned_by}{f': {p.reason}' if p.reason else ''})"
        for p in sorted(pinned, key=lambda p: p.instance_id)
    )
    return PolicyRefusal(
        "pinned_no_room",
        f"no room for {model_id} on {where}: only unloading pinned models would make it ({named}), "
        "and pins are never broken; ask an admin to unpin, or try another GPU",
    )
