"""The victim choice (models_app/eviction.py): the fewest instances that make room on one GPU set; among equals
the least recently used, then the most memory freed; never one that is kept; the same inputs, the same victims."""

import random

import pytest

from models_app.eviction import EXACT_SEARCH_LIMIT, Plan, Resident, choose_victims, kept_reasons, why_kept


def resident(pk, mib, idle_since, gpu=0, kept=""):
    claim = mib if isinstance(mib, dict) else {gpu: mib}
    return Resident(instance_id=pk, model_id=f"m{pk}", claim_mib=claim, idle_since=idle_since, why_kept=kept)


def ids(plan: Plan | None):
    return None if plan is None else [v.instance_id for v in plan.victims]


def test_no_shortfall_needs_no_victims():
    plan = choose_victims([((0,), {0: 0})], [resident(1, 1000, 5)])
    assert plan is not None and plan.victims == ()


def test_fewest_victims_before_least_recently_used():
    # one big recent model frees enough alone; two old small ones would be needed otherwise
    residents = [resident(1, 1000, idle_since=10), resident(2, 1000, idle_since=20), resident(3, 3000, 90)]
    assert ids(choose_victims([((0,), {0: 2500})], residents)) == [3]


def test_least_recently_used_among_equals_then_most_freed():
    residents = [resident(1, 2000, idle_since=50), resident(2, 2000, idle_since=10), resident(3, 4000, 10)]
    # 2 and 3 are equally old: 3 frees more
    assert ids(choose_victims([((0,), {0: 1500})], residents)) == [3]
    residents[2] = resident(3, 4000, 30)
    assert ids(choose_victims([((0,), {0: 1500})], residents)) == [2]


def test_kept_instances_are_never_victims_and_are_explained():
    residents = [resident(1, 8000, 1, kept="1 request(s) in flight"), resident(2, 1000, 2)]
    assert choose_victims([((0,), {0: 5000})], residents) is None
    assert kept_reasons([0], residents) == ["m1 (#1): 1 request(s) in flight"]


def test_a_victim_must_free_memory_on_every_short_gpu_of_the_set():
    split = resident(1, {0: 3000, 1: 3000}, 5)
    only_zero = resident(2, {0: 9000}, 1)
    plan = choose_victims([((0, 1), {0: 2000, 1: 2000})], [split, only_zero])
    assert ids(plan) == [1]


def test_the_gpu_set_needing_fewest_victims_wins_then_placement_order():
    on_zero = [resident(1, 1000, 1, gpu=0), resident(2, 1000, 2, gpu=0)]
    on_one = [resident(3, 2500, 3, gpu=1)]
    plan = choose_victims([((0,), {0: 1800}), ((1,), {1: 1800})], on_zero + on_one)
    assert plan.gpus == (1,) and ids(plan) == [3]
    # equal plans everywhere: placement's order decides
    twins = [resident(1, 2000, 5, gpu=0), resident(2, 2000, 5, gpu=1)]
    assert choose_victims([((1,), {1: 100}), ((0,), {0: 100})], twins).gpus == (1,)


@pytest.mark.parametrize("seed", range(20))
def test_same_inputs_same_victims_whatever_the_order(seed):
    rng = random.Random(seed)
    residents = [
        resident(pk, rng.choice([500, 1000, 2000, 4000]), rng.randrange(5), gpu=rng.randrange(3))
        for pk in range(1, 10)
    ]
    candidates = [((g,), {g: rng.randrange(500, 6000)}) for g in range(3)]
    first = choose_victims(candidates, residents)
    shuffled = residents[:]
    rng.shuffle(shuffled)
    again = choose_victims(candidates, shuffled)
    assert ids(first) == ids(again)
    if first is not None:  # the plan makes room, and no smaller set of victims on that GPU would
        need = dict(candidates)[first.gpus]
        gpu = first.gpus[0]
        assert sum(v.claim_mib.get(gpu, 0) for v in first.victims) >= need[gpu]
        smaller = [
            r for r in residents if gpu in r.claim_mib and r not in first.victims
        ]  # replacing one victim by any single other never reaches with fewer
        assert len(first.victims) == 1 or not any(r.claim_mib[gpu] >= need[gpu] for r in smaller)


def test_many_idle_models_fall_back_to_oldest_first_and_trim():
    residents = [resident(pk, 100, idle_since=pk) for pk in range(1, EXACT_SEARCH_LIMIT + 6)]
    residents.append(resident(99, 5000, idle_since=50))
    plan = choose_victims([((0,), {0: 350})], residents)
    assert ids(plan) == [1, 2, 3, 4]


def test_why_kept_in_words():
    base = dict(
        status="running",
        evictable_kind=True,
        in_flight=0,
        idle_seconds=600,
        resident_seconds=900,
        min_idle_seconds=60,
        min_residency_seconds=120,
    )
    assert why_kept(**base) == ""
    assert why_kept(**{**base, "status": "starting"}) == "it is starting"
    assert why_kept(**{**base, "evictable_kind": False}) == "loaded by hand without a keep-alive"
    assert why_kept(**{**base, "in_flight": 2}) == "2 request(s) in flight"
    assert "used 5 s ago" in why_kept(**{**base, "idle_seconds": 5})
    assert "loaded 30 s ago" in why_kept(**{**base, "resident_seconds": 30})


def test_borrowed_memory_is_reclaimed_first_even_if_used_a_moment_ago():
    recent_borrowed = Resident(1, "b", {0: 1000}, idle_since=100, borrowed=True)
    old_guaranteed = Resident(2, "g", {0: 1000}, idle_since=1)
    assert ids(choose_victims([((0,), {0: 900})], [recent_borrowed, old_guaranteed])) == [1]
    base = dict(status="running", evictable_kind=True, in_flight=0, idle_seconds=1, resident_seconds=1,
                min_idle_seconds=60, min_residency_seconds=120)  # fmt: skip
    assert why_kept(**base, borrowed=True) == ""
    assert why_kept(**{**base, "in_flight": 1}, borrowed=True) == "1 request(s) in flight"
