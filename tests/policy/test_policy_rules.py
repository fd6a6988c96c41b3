"""The policy's plain rules (no database): quotas combined, guaranteed and borrowed, refusals with their numbers,
reservation windows (overlap, memory, the sentences) and the pinned_no_room sentence."""

from datetime import UTC, datetime, timedelta

import pytest

from models_app.errors import STATUS, Refused
from policy import rules, windows
from policy.reasons import REASONS, PolicyRefusal, mib
from policy.rules import BORROWED, GUARANTEED, Claim, Limits


def claim(instance_id, mib_, gpus=(1,), model="m"):
    return Claim(instance_id, model, tuple(gpus), mib_)


def test_mib_writes_thousands_with_a_space():
    assert mib(61440) == "61 440 MiB"
    assert mib(22) == "22 MiB"


def test_every_reason_maps_to_one_status_and_refusal_code():
    assert {r: s for r, (s, _) in REASONS.items()} == {
        "quota_gpu_memory": 429,
        "quota_gpus": 429,
        "quota_models": 429,
        "quota_model_not_allowed": 429,
        "reservation": 409,
        "pinned_no_room": 503,
    }
    # each is the project's one refusal, with the code whose status is the reason's
    assert all(STATUS[code] == status for status, code in REASONS.values())
    refusal = PolicyRefusal("pinned_no_room", "x")
    assert isinstance(refusal, Refused)
    assert (refusal.status, refusal.code, refusal.message) == (503, "unavailable", "pinned_no_room: x")
    with pytest.raises(ValueError):
        PolicyRefusal("quota_everything", "x")


def test_the_issue_sentence_for_gpu_memory():
    limits = Limits(gpu_memory_mib=65536, source="your own quota")
    decision = rules.decide(limits, [claim(1, 61440)], claim(None, 6100, model="llama-8b"))
    assert decision.standing == BORROWED and not decision.refused
    assert decision.refusal.message == (
        "quota_gpu_memory: you hold 61 440 MiB of your 65 536 MiB (your own quota); llama-8b needs ≈ 6 100 MiB"
    )
    assert decision.refusal.status == 429


def test_within_quota_is_guaranteed_and_the_edge_counts_as_within():
    limits = Limits(gpu_memory_mib=1000, gpus=2, models_loaded=2)
    assert rules.decide(limits, [claim(1, 400)], claim(None, 600, gpus=(2,))).standing == GUARANTEED
    assert rules.decide(limits, [claim(1, 400)], claim(None, 601)).standing == BORROWED


def test_gpus_and_models_refusals_say_the_numbers():
    limits = Limits(gpus=1, models_loaded=5)
    refusal = rules.decide(
        limits, [claim(1, 10, gpus=(7,))], claim(None, 10, gpus=(7, 8), model="big")
    ).refusal
    assert refusal.reason == "quota_gpus"
    assert refusal.sentence == "you hold 1 of your 1 GPU(s); big would add 1 more"
    limits = Limits(models_loaded=2)
    refusal = rules.decide(limits, [claim(1, 10), claim(2, 10)], claim(None, 10, model="third")).refusal
    assert (refusal.reason, refusal.sentence) == (
        "quota_models",
        "you have 2 of your 2 model(s) loaded; third would be one more",
    )


def test_a_model_outside_the_allowed_list_is_refused_even_with_room():
    limits = Limits(allowed_models=frozenset({"a", "b"}), source="group nlp's quota")
    decision = rules.decide(limits, [], claim(None, 1, model="c"))
    assert decision.refused
    assert decision.refusal.message == (
        "quota_model_not_allowed: c is not among the models your quota allows (group nlp's quota): a, b"
    )
    assert rules.decide(limits, [], claim(None, 1, model="a")).standing == GUARANTEED


def test_a_hard_quota_refuses_beyond_it_and_check_raises():
    hard = Limits(models_loaded=1, hard=True)
    decision = rules.decide(hard, [claim(1, 1)], claim(None, 1))
    assert decision.refused
    with pytest.raises(PolicyRefusal):
        decision.check(needs_room=False)


def test_borrowed_runs_on_free_memory_only():
    decision = rules.decide(Limits(models_loaded=1), [claim(1, 1)], claim(None, 1))
    assert decision.check(needs_room=False) == BORROWED
    with pytest.raises(PolicyRefusal) as refused:
        decision.check(needs_room=True)
    assert refused.value.reason == "quota_models"
    assert (
        rules.decide(Limits(models_loaded=2), [claim(1, 1)], claim(None, 1)).check(needs_room=True)
        == GUARANTEED
    )


def test_no_quota_is_unlimited():
    assert rules.combine(None, []) is rules.UNLIMITED
    assert rules.decide(
        rules.UNLIMITED, [claim(i, 10**6) for i in range(50)], claim(None, 10**6)
    ).standing == (GUARANTEED)


def test_the_users_own_quota_wins_over_their_groups():
    own = Limits(gpu_memory_mib=100, source="your own quota")
    groups = [Limits(gpu_memory_mib=10**6)]
    assert rules.combine(own, groups) is own


def test_groups_combine_to_the_most_generous_resource_by_resource():
    a = Limits(
        gpu_memory_mib=1000,
        gpus=1,
        models_loaded=None,
        allowed_models=frozenset({"x"}),
        hard=True,
        source="a",
    )
    b = Limits(
        gpu_memory_mib=4000,
        gpus=None,
        models_loaded=3,
        allowed_models=frozenset({"y"}),
        hard=False,
        source="b",
    )
    both = rules.combine(None, [a, b])
    assert (both.gpu_memory_mib, both.gpus, both.models_loaded) == (4000, None, None)
    assert both.allowed_models == {"x", "y"} and not both.hard and both.source == "a / b"
    c = Limits(gpu_memory_mib=10, allowed_models=None, hard=True)
    assert rules.combine(None, [a, c]).allowed_models is None
    assert rules.combine(None, [a, c]).hard


def test_standings_follow_admission_order_and_move_up_when_one_goes():
    limits = Limits(gpu_memory_mib=1000)
    held = [claim(1, 600), claim(2, 300), claim(3, 500), claim(4, 50)]
    # 600, 900 within; 1400 beyond; 1450 beyond (everything held counts, borrowed too)
    assert rules.standings(limits, held) == {1: GUARANTEED, 2: GUARANTEED, 3: BORROWED, 4: BORROWED}
    # the first is unloaded: the third moves within the quota
    assert rules.standings(limits, held[1:]) == {2: GUARANTEED, 3: GUARANTEED, 4: GUARANTEED}
    # a tighter quota unloads nothing: it only moves the line
    assert rules.standings(Limits(gpu_memory_mib=600), held) == {
        1: GUARANTEED,
        2: BORROWED,
        3: BORROWED,
        4: BORROWED,
    }


def test_a_model_no_longer_allowed_is_borrowed():
    limits = Limits(allowed_models=frozenset({"a"}))
    assert rules.standings(limits, [claim(1, 1, model="a"), claim(2, 1, model="b")]) == {
        1: GUARANTEED,
        2: BORROWED,
    }


def test_pinned_no_room_names_the_pins():
    refusal = rules.pinned_no_room(
        "llama-8b",
        "GPU 0 of box-1",
        [rules.PinnedHolder(9, "qwen", "bob"), rules.PinnedHolder(4, "gemma", "alice", "demo tomorrow")],
    )
    assert refusal.status == 503
    assert refusal.message == (
        "pinned_no_room: no room for llama-8b on GPU 0 of box-1: only unloading pinned models would make it "
        "(gemma (#4, pinned by alice: demo tomorrow); qwen (#9, pinned by bob)), and pins are never broken; "
        "ask an admin to unpin, or try another GPU"
    )


# --- reservation windows ------------------------------------------------------------------------------

T0 = datetime(2026, 12, 7, 14, 0, tzinfo=UTC)
TOTALS = {0: 24000, 1: 24000}


def window(rid, start_h, end_h, gpus=(), memory=None, purpose="p", holders="nlp"):
    return windows.Window(
        rid,
        "box",
        T0 + timedelta(hours=start_h),
        T0 + timedelta(hours=end_h),
        frozenset(gpus),
        memory,
        purpose,
        holders,
    )


def test_windows_on_a_shared_gpu_conflict_only_when_they_overlap():
    existing = [window(1, 0, 4, gpus=(0,), purpose="fine-tune")]
    assert windows.conflict(window(None, 4, 6, gpus=(0,)), existing, TOTALS, 48000) is None  # back to back
    assert windows.conflict(window(None, 2, 6, gpus=(1,)), existing, TOTALS, 48000) is None  # another GPU
    reason = windows.conflict(window(None, 3, 6, gpus=(0, 1)), existing, TOTALS, 48000)
    assert (
        reason
        == 'GPU 0 of box is already held from Mon 07 Dec 14:00 to Mon 07 Dec 18:00 by reservation #1 "fine-tune" for nlp'
    )


def test_memory_windows_conflict_when_the_host_would_run_out():
    existing = [window(1, 0, 2, memory=30000), window(2, 3, 5, memory=30000)]
    # 30 000 + 10 000 at any moment: fits; 30 000 + 20 000 from 14:00: more than 48 000
    assert windows.conflict(window(None, 0, 5, memory=10000), existing, TOTALS, 48000) is None
    reason = windows.conflict(window(None, 1, 4, memory=20000), existing, TOTALS, 48000)
    assert reason.startswith(
        "at Mon 07 Dec 15:00 the reservations on box would hold 50 000 MiB, more than its 48 000 MiB"
    )
    # a reserved GPU holds its whole memory
    reason = windows.conflict(window(None, 0, 1, memory=30000), [window(3, 0, 1, gpus=(0,))], TOTALS, 48000)
    assert "54 000 MiB" in reason
    assert "more than box has" in windows.conflict(window(None, 0, 1, memory=50000), [], TOTALS, 48000)


def test_a_window_fences_from_its_notice_until_its_end():
    w = windows.Window(1, "box", T0, T0 + timedelta(hours=2), frozenset({0}), notice=timedelta(minutes=30))
    assert not w.fences(T0 - timedelta(minutes=31))
    assert w.fences(T0 - timedelta(minutes=30))
    assert w.fences(T0 + timedelta(hours=2) - timedelta(seconds=1))
    assert not w.fences(T0 + timedelta(hours=2))


def test_the_blocked_and_drain_sentences():
    w = window(3, 0, 4, gpus=(0,), purpose="fine-tune run", holders="group nlp")
    refusal = windows.blocked(w, "llama-8b", 3600)
    assert (refusal.status, refusal.retry_after) == (409, 3600)
    assert refusal.message == (
        "reservation: GPU 0 of box is reserved from Mon 07 Dec 14:00 to Mon 07 Dec 18:00 for group nlp "
        '("fine-tune run"); llama-8b cannot load there before Mon 07 Dec 18:00'
    )
    assert windows.drain_notice(w, "gemma", 12) == (
        "reservation: gemma (#12) on GPU 0 of box will be unloaded at Mon 07 Dec 14:00 for reservation #3 "
        '"fine-tune run" for group nlp (until Mon 07 Dec 18:00); load it elsewhere or after the window'
    )
