"""Making room: which idle models to unload so that a load fits. Plain Python over plain data (no Django, no
database), so the admission code and `bench/packing.py`'s simulation run the same choice.

The rule (README "Sharing GPUs"): only an idle model may be evicted — running, loaded on demand (or its model
sets a keep-alive), no request in flight for at least `min_idle_seconds`, loaded for at least
`min_residency_seconds`. Never one that loads, stops, serves a request, or was loaded by hand without a
keep-alive. Among the GPU sets the model may go to, the plan that evicts the fewest instances wins; among
equals, the one whose victims were used least recently, then the one that frees the most memory, then the
GPU set placement prefers. The same inputs always give the same victims."""

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import combinations

# Above this many evictable instances on one GPU set, the exact search (every combination, smallest first)
# gives way to taking victims least recently used first: a GPU with 13 idle models is rare, and the greedy
# choice is then within one victim of the smallest.
EXACT_SEARCH_LIMIT = 12


@dataclass(frozen=True)
class Resident:
    """An active instance as eviction sees it. `claim_mib`: what it holds on each GPU (key: the GPU's id),
    freed when it stops. `idle_since`: seconds (any clock, the same for all) since which it serves nothing;
    `why_kept`: empty when it may be evicted, else the reason it may not ("a request in flight")."""

    instance_id: int
    model_id: str
    claim_mib: dict
    idle_since: float
    why_kept: str = ""
    borrowed: bool = False  # beyond its owner's quota (policy): reclaimed before any other
    borrowed: bool = False  # beyond its owner's quota (policy): reclaimed before any other

    @property
    def evictable(self) -> bool:
        return not self.why_kept


def why_kept(
    *,
    status: str,
    evictable_kind: bool,
    in_flight: int,
    idle_seconds: float,
    resident_seconds: float,
    min_idle_seconds: float,
    min_residency_seconds: float,
    borrowed: bool = False,
) -> str:
    """Why an instance may not be evicted now, in words; "" when it may. `evictable_kind`: loaded on demand,
    or its model sets a keep-alive (a model loaded by hand without one stays until someone unloads it).
    `borrowed`: beyond its owner's quota (the policy app), evictable however recently used."""
    if status != "running":
        return f"it is {status}"
    if not evictable_kind:
        return "loaded by hand without a keep-alive"
    if in_flight > 0:
        return f"{in_flight} request(s) in flight"
    if borrowed:  # memory beyond its owner's quota: reclaimed even if used a moment ago
        return ""
    if idle_seconds < min_idle_seconds:
        return f"used {int(idle_seconds)} s ago (an eviction needs {int(min_idle_seconds)} s idle)"
    if resident_seconds < min_residency_seconds:
        return (
            f"loaded {int(resident_seconds)} s ago (an eviction needs {int(min_residency_seconds)} s loaded)"
        )
    return ""


@dataclass(frozen=True)
class Plan:
    """Victims that make room for a load on `gpus` (GPU ids, in placement's order)."""

    gpus: tuple
    victims: tuple  # of Resident, least recently used first
    freed_mib: int = 0
    # set index in the caller's list of GPU sets (the placement order): the last tie-break
    rank: int = 0
    notes: list = field(default_factory=list, compare=False)

    def key(self) -> tuple:
        # fewest victims within their quota (borrowed memory is reclaimed first); then fewest victims; then least
        # recently used (the most recent use among the victims, then the next); then most memory freed; then
        # placement's order; then instance ids (never equal for two plans).
        recency = tuple(sorted((v.idle_since for v in self.victims), reverse=True))
        guaranteed = sum(1 for v in self.victims if not v.borrowed)
        ids = tuple(v.instance_id for v in self.victims)
        return (guaranteed, len(self.victims), recency, -self.freed_mib, self.rank, ids)


def _makes_room(victims: Sequence[Resident], shortfall: dict) -> bool:
    return all(sum(v.claim_mib.get(gpu, 0) for v in victims) >= need for gpu, need in shortfall.items())


def _plans_for_set(gpus: tuple, shortfall: dict, residents: Iterable[Resident], rank: int) -> Plan | None:
    """The best victims on one GPU set: the fewest instances whose claims cover `shortfall` (MiB missing on
    each GPU of the set), or None when evicting every evictable one there would not do."""
    wanted = {gpu: need for gpu, need in shortfall.items() if need > 0}
    if not wanted:
        return Plan(gpus, (), 0, rank)
    # only evictable instances that hold memory on a GPU short of it can help
    useful = sorted(
        (r for r in residents if r.evictable and any(r.claim_mib.get(g, 0) > 0 for g in wanted)),
        key=lambda r: (r.idle_since, r.instance_id),
    )
    if not _makes_room(useful, wanted):
        return None

    def plan(victims) -> Plan:
        freed = sum(v.claim_mib.get(g, 0) for v in victims for g in gpus)
        return Plan(gpus, tuple(victims), freed, rank)

    if len(useful) > EXACT_SEARCH_LIMIT:
        chosen = []
        for resident in useful:  # least recently used first, until the room is there
            chosen.append(resident)
            if _makes_room(chosen, wanted):
                break
        # drop the ones the later choices made unnecessary (the newest first)
        for resident in sorted(chosen, key=lambda r: -r.idle_since):
            rest = [c for c in chosen if c is not resident]
            if _makes_room(rest, wanted):
                chosen = rest
        return plan(chosen)
    for size in range(1, len(useful) + 1):
        fitting = [plan(combo) for combo in combinations(useful, size) if _makes_room(combo, wanted)]
        if fitting:
            return min(fitting, key=Plan.key)
    return None  # not reached: all of `useful` makes room


def choose_victims(candidates: Sequence[tuple[tuple, dict]], residents: Iterable[Resident]) -> Plan | None:
    """The eviction plan for a load, or None when no set of idle models makes room anywhere.
    `candidates`: the GPU sets the model may load on, in placement's order, each with its shortfall (MiB
    missing on each of its GPUs after the claims already there; 0 or less where it fits). A set that needs
    no eviction gives a plan without victims (the caller would not have asked)."""
    residents = list(residents)
    plans = []
    for rank, (gpus, shortfall) in enumerate(candidates):
        on_set = [r for r in residents if any(g in r.claim_mib for g in gpus)]
        found = _plans_for_set(tuple(gpus), shortfall, on_set, rank)
        if found is not None:
            plans.append(found)
    return min(plans, key=Plan.key) if plans else None


def kept_reasons(gpus: Iterable, residents: Iterable[Resident]) -> list[str]:
    """Why nothing on these GPUs may be evicted, one line per instance ("gemma3-270m (#4): 1 request(s) in
    flight"), for the refusal."""
    gpus = set(gpus)
    return [
        f"{r.model_id} (#{r.instance_id}): {r.why_kept}"
        for r in sorted(residents, key=lambda r: r.instance_id)
        if r.why_kept and gpus & set(r.claim_mib)
    ]
