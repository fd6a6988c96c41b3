"""The policy against the database: quotas from users and groups, the decision admission asks for, standings
and borrowed instances, reservations (conflicts, blocks, the drain with its notice and unload) and pins."""

from datetime import timedelta

import pytest
from django.contrib.auth.models import Group
from django.utils import timezone

from models_app.models import GpuInstance, InstanceEvent, ModelConfig
from policy import admission, drain, pins, quotas, reservations
from policy.models import DrainNotice, Pin, Quota
from policy.reasons import PolicyRefusal
from tests.api.factories import make_gpus, make_instance

Kind = InstanceEvent.Kind


@pytest.fixture
def team(users):
    nlp = Group.objects.create(name="nlp")
    users["operator"].groups.add(nlp)
    return nlp


def quota(**fields):
    allowed = fields.pop("allowed", [])
    made = Quota.objects.create(**fields)
    made.allowed_models.set(allowed)
    return made


def test_a_user_without_quota_is_unlimited_and_guaranteed(users, tiny_model, fake_gpus):
    decision = quotas.decide(users["operator"], model_id="tiny", gpus=[fake_gpus.gpus[0].pk], claim_mib=10**6)
    assert decision.check(needs_room=True) == "guaranteed"
    assert quotas.decide(None, model_id="tiny", gpus=[], claim_mib=1).standing == "guaranteed"


def test_group_quota_applies_until_the_user_has_their_own(users, team, tiny_model, fake_gpus):
    operator = users["operator"]
    make_instance(
        [fake_gpus.gpus[0]], tiny_model, owner=operator, memory_used_mb=3000, memory_estimated_mb=2500
    )
    quota(group=team, gpu_memory_mib=4000)
    decision = quotas.decide(operator, model_id="tiny", gpus=[fake_gpus.gpus[1].pk], claim_mib=1500)
    assert decision.standing == "borrowed"
    assert decision.refusal.message == (
        "quota_gpu_memory: you hold 3 000 MiB of your 4 000 MiB (group nlp's quota); tiny needs ≈ 1 500 MiB"
    )
    quota(user=operator, gpu_memory_mib=8000)
    assert quotas.decide(operator, model_id="tiny", gpus=[], claim_mib=1500).standing == "guaranteed"
    # someone else in no group with a quota: unlimited
    assert (
        quotas.decide(users["operator2"], model_id="tiny", gpus=[], claim_mib=10**5).standing == "guaranteed"
    )


def test_only_active_instances_count(users, tiny_model, fake_gpus):
    operator = users["operator"]
    quota(user=operator, models_loaded=1, hard=True)
    make_instance([fake_gpus.gpus[0]], tiny_model, owner=operator, status="stopped")
    assert quotas.decide(operator, model_id="tiny", gpus=[], claim_mib=1).standing == "guaranteed"
    make_instance([fake_gpus.gpus[1]], tiny_model, owner=operator, status="starting")
    decision = quotas.decide(operator, model_id="tiny", gpus=[], claim_mib=1)
    with pytest.raises(PolicyRefusal) as refused:
        decision.check(needs_room=False)
    assert refused.value.reason == "quota_models" and refused.value.status == 429


def test_allowed_models(users, team, tiny_model):
    second_model = ModelConfig.objects.create(id="tiny2", name="Tiny two", path=tiny_model.path)
    quota(group=team, allowed=[second_model])
    decision = quotas.decide(users["operator"], model_id="tiny", gpus=[], claim_mib=1)
    assert decision.refused and decision.refusal.reason == "quota_model_not_allowed"
    assert quotas.decide(users["operator"], model_id="tiny2", gpus=[], claim_mib=1).standing == "guaranteed"


def test_standings_and_borrowed_instance_ids_over_everyone(users, team, tiny_model, fake_gpus):
    gpus = fake_gpus.gpus + make_gpus(2)
    operator, other = users["operator"], users["operator2"]
    quota(group=team, models_loaded=1)
    first = make_instance([gpus[0]], tiny_model, owner=operator)
    second = make_instance([gpus[1]], tiny_model, owner=operator)
    theirs = make_instance([gpus[2]], tiny_model, owner=other)
    nobodys = make_instance([gpus[3]], tiny_model, owner=None)
    assert quotas.standings() == {
        first.pk: "guaranteed",
        second.pk: "borrowed",
        theirs.pk: "guaranteed",
        nobodys.pk: "guaranteed",
    }
    assert quotas.borrowed_instance_ids() == {second.pk}
    GpuInstance.objects.filter(pk=first.pk).update(status="stopped")
    assert quotas.borrowed_instance_ids() == set()  # the second moved up within the quota


def test_usage_is_the_users_use_against_their_quota(users, team, tiny_model, fake_gpus):
    quota(group=team, gpu_memory_mib=6000, gpus=2)
    make_instance(fake_gpus.gpus, tiny_model, owner=users["operator"], memory_used_mb=5123)
    usage = quotas.usage(users["operator"])
    assert usage["limits"] == {"gpu_memory_mib": 6000, "gpus": 2, "models_loaded": None}
    assert usage["used"] == {"gpu_memory_mib": 5123, "gpus": 2, "models_loaded": 1}
    assert usage["source"] == "group nlp's quota" and usage["allowed_models"] is None
    assert [i["standing"] for i in usage["instances"]] == ["guaranteed"]


def test_quota_changes_are_audited(users, team):
    made = quota(group=team, gpus=2)
    quotas.record_saved(made, users["admin"], before=None)
    before = quotas.describe(made)
    made.gpus = 3
    made.save()
    quotas.record_saved(made, users["admin"], before=before)
    quotas.record_saved(made, users["admin"], before=quotas.describe(made))  # nothing changed: no event
    quotas.delete(made, users["admin"])
    details = list(
        InstanceEvent.objects.filter(kind=Kind.QUOTA_CHANGED).order_by("pk").values_list("detail", flat=True)
    )
    assert details == [
        "quota of group nlp set: GPU memory no limit, GPUs 2, models loaded no limit, allowed models any "
        "(nothing running is unloaded)",
        "quota of group nlp was GPU memory no limit, GPUs 2, models loaded no limit, allowed models any; now GPU "
        "memory no limit, GPUs 3, models loaded no limit, allowed models any (nothing running is unloaded)",
        "quota of group nlp removed (was GPU memory no limit, GPUs 3, models loaded no limit, allowed models any)",
    ]


# --- reservations ------------------------------------------------------------------------------------


def reserve(host, admin, hours=(1, 3), **fields):
    now = timezone.now()
    fields.setdefault("gpu_indices", [0])
    fields.setdefault("users", [])
    return reservations.create(
        host=host,
        start=now + timedelta(hours=hours[0]),
        end=now + timedelta(hours=hours[1]),
        purpose=fields.pop("purpose", "fine-tune"),
        actor=admin,
        **fields,
    )


def test_conflicting_reservations_are_refused_at_creation(users, team, fake_gpus):
    host, admin = fake_gpus.host, users["admin"]
    first = reserve(host, admin, groups=[team])
    with pytest.raises(reservations.ReservationConflict, match="GPU 0 of testhost is already held"):
        reserve(host, admin, hours=(2, 4), gpu_indices=[0, 1], users=[users["operator2"]])
    reserve(host, admin, hours=(3, 4), users=[users["operator2"]])  # right after it
    with pytest.raises(
        reservations.ReservationConflict, match="would hold 49 129 MiB, more than its 49 128 MiB"
    ):
        reserve(host, admin, hours=(0, 2), gpu_indices=[], memory_mib=24565, users=[users["viewer"]])
    with pytest.raises(ValueError, match="testhost has no GPU 7"):
        reserve(host, admin, hours=(5, 6), gpu_indices=[7])
    event = InstanceEvent.objects.filter(kind=Kind.RESERVATION_CHANGED).order_by("pk").first()
    assert event.detail.startswith(
        f'reservation #{first.pk} "fine-tune" for group nlp created: GPU 0 of testhost'
    )


def test_a_reservation_blocks_others_from_its_notice_to_its_end(users, team, fake_gpus):
    host = fake_gpus.host
    made = reserve(host, users["admin"], groups=[team], notice_minutes=30)
    outsider, holder = users["operator2"], users["operator"]
    assert reservations.blocks(outsider, host, [0]) is None  # an hour before: not yet
    during_notice = made.start - timedelta(minutes=10)
    refusal = reservations.blocks(outsider, host, [1, 0], model_id="tiny", at=during_notice)
    assert refusal.reason == "reservation" and refusal.status == 409
    assert "reserved from" in refusal.sentence and '("fine-tune")' in refusal.sentence
    assert refusal.retry_after == int((made.end - during_notice).total_seconds())
    assert reservations.blocks(holder, host, [0], at=during_notice) is None
    assert reservations.blocks(outsider, host, [1], at=during_notice) is None
    assert reservations.blocks(outsider, host, [0], at=made.end) is None  # after it ends: everyone's again


def test_a_memory_reservation_holds_memory_back_from_others(users, team, fake_gpus):
    host = fake_gpus.host
    made = reserve(host, users["admin"], gpu_indices=[], memory_mib=20000, groups=[team])
    assert reservations.held_back_mib(users["operator2"], host, at=made.start) == 20000
    assert reservations.held_back_mib(users["operator"], host, at=made.start) == 0
    assert reservations.held_back_mib(users["operator2"], host, at=made.end) == 0
    assert reservations.blocks(users["operator2"], host, [0], at=made.start) is None


def test_the_drain_tells_owners_then_unloads_at_the_start(
    users, team, live, tiny_model, sent, django_capture_on_commit_callbacks
):
    host = live.host
    admin, holder, other = users["admin"], users["operator"], users["operator2"]
    third = make_gpus(1)[0]
    theirs = make_instance([live.gpus[0]], tiny_model, owner=other)
    holders_own = make_instance([third], tiny_model, owner=holder)  # a holder's model stays
    elsewhere = make_instance([live.gpus[1]], tiny_model, owner=other)  # not on a reserved GPU
    made = reserve(host, admin, hours=(1, 3), gpu_indices=[0, 2], groups=[team], notice_minutes=30)

    assert drain.to_drain(made.start - timedelta(minutes=31)) == []
    noticed = made.start - timedelta(minutes=20)
    found = drain.to_drain(noticed)
    assert [(d.instance.pk, d.due) for d in found] == [(theirs.pk, False)]
    assert drain.drain(noticed) == (1, 0)
    assert drain.drain(noticed) == (0, 0)  # told once
    notice = InstanceEvent.objects.get(kind=Kind.RESERVATION_NOTICE)
    assert notice.instance_id == theirs.pk
    assert "will be unloaded at" in notice.detail and "fine-tune" in notice.detail

    with django_capture_on_commit_callbacks(execute=True):
        assert drain.drain(made.start + timedelta(seconds=1)) == (0, 1)
    theirs.refresh_from_db()
    assert theirs.status == GpuInstance.Status.STOPPING
    assert [(name, args) for name, args, _ in sent] == [("unload_model", [theirs.pk, None])]
    unload = InstanceEvent.objects.filter(instance=theirs, kind=Kind.UNLOAD_REQUESTED).get()
    assert unload.detail.startswith("reservation: tiny")
    assert DrainNotice.objects.get(instance=theirs).drained_at is not None
    for kept in (holders_own, elsewhere):
        kept.refresh_from_db()
        assert kept.status == GpuInstance.Status.RUNNING
    assert drain.to_drain(made.end) == []


def test_a_pinned_instance_is_told_but_never_drained(
    users, team, live, tiny_model, sent, django_capture_on_commit_callbacks
):
    other = make_instance([live.gpus[0]], tiny_model, owner=users["operator2"])
    pins.pin(other, actor=users["admin"], reason="demo")
    made = reserve(live.host, users["admin"], groups=[team])
    with django_capture_on_commit_callbacks(execute=True):
        assert drain.drain(made.start) == (1, 0)
    assert "it is pinned, so it stays" in InstanceEvent.objects.get(kind=Kind.RESERVATION_NOTICE).detail
    assert sent == []


# --- pins --------------------------------------------------------------------------------------------


def test_pins_are_audited_and_only_active_ones_count(users, tiny_model, fake_gpus):
    running = make_instance([fake_gpus.gpus[0]], tiny_model, owner=users["operator"])
    stopped = make_instance([fake_gpus.gpus[1]], tiny_model, status="stopped")
    made = pins.pin(running, actor=users["admin"], reason="demo tomorrow")
    with pytest.raises(pins.PinRefused, match="already pinned") as twice:
        pins.pin(running, actor=users["admin"])
    assert twice.value.status == 409
    with pytest.raises(pins.PinRefused, match="not loaded") as inactive:
        pins.pin(stopped, actor=users["admin"])
    assert inactive.value.status == 400
    assert pins.pinned_instance_ids() == {running.pk}
    refusal = pins.no_room("big", "GPU 0 of testhost", [running.pk])
    assert (
        refusal.reason == "pinned_no_room"
        and f"tiny (#{running.pk}, pinned by admin: demo tomorrow)" in refusal.sentence
    )
    GpuInstance.objects.filter(pk=running.pk).update(status="stopped")
    assert pins.pinned_instance_ids() == set()
    pins.unpin(made, actor=users["admin"])
    assert not Pin.objects.exists()
    assert list(
        InstanceEvent.objects.filter(kind=Kind.PIN_CHANGED).order_by("pk").values_list("detail", flat=True)
    ) == [
        f"tiny (#{running.pk}) pinned: demo tomorrow",
        f"tiny (#{running.pk}) unpinned",
    ]


# --- the one call for admission -------------------------------------------------------------------------


def test_check_load_reservation_first_then_quota(users, team, fake_gpus, tiny_model):
    host, gpus = fake_gpus.host, fake_gpus.gpus
    operator, other = users["operator"], users["operator2"]
    quota(user=other, models_loaded=1)
    make_instance([gpus[1]], tiny_model, owner=other)
    now = timezone.now()
    check = admission.check_load
    assert (
        check(operator, host=host, gpus=[gpus[0]], model_id="tiny", claim_mib=100, needs_room=True)
        == "guaranteed"
    )
    assert (
        check(other, host=host, gpus=[gpus[0]], model_id="tiny", claim_mib=100, needs_room=False)
        == "borrowed"
    )
    with pytest.raises(PolicyRefusal) as refused:
        check(other, host=host, gpus=[gpus[0]], model_id="tiny", claim_mib=100, needs_room=True)
    assert refused.value.reason == "quota_models"
    reservations.create(
        host=host, start=now, end=now + timedelta(hours=1), purpose="x", actor=users["admin"], gpu_indices=[0],
        groups=[team],
    )  # fmt: skip
    with pytest.raises(PolicyRefusal) as refused:
        check(other, host=host, gpus=[gpus[0]], model_id="tiny", claim_mib=100, needs_room=True)
    assert refused.value.reason == "reservation"
    assert (
        check(operator, host=host, gpus=[gpus[0]], model_id="tiny", claim_mib=100, needs_room=True)
        == "guaranteed"
    )
