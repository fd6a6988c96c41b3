"""Making room (models_app/making_room.py) through the real services and database: a load that does not fit
evicts the least recently used idle model loaded on demand, with an event that says why; never one with a
request in flight, loaded by hand without a keep-alive, or used too recently; when nothing may go, the refusal
says why each stays and when to come back."""

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from gpus.models import Gpu
from models_app import making_room, ondemand, services
from models_app.errors import Refused
from models_app.models import GpuInstance, InstanceEvent, ModelConfig

Status = GpuInstance.Status
TOTAL_MIB = 1400  # with a 200 MiB headroom (claims of about 500 MiB), two tiny models fit on GPU 0, not three


@pytest.fixture
def one_small_gpu(live, fake_gpus, settings):
    settings.GPU_HEADROOM_MIB = 200
    settings.EVICT_MIN_IDLE_SECONDS = 60
    settings.EVICT_MIN_RESIDENCY_SECONDS = 120
    gpu0, gpu1 = fake_gpus.gpus
    Gpu.objects.filter(pk=gpu0.pk).update(memory_total_mib=TOTAL_MIB, memory_used_mib=10)
    Gpu.objects.filter(pk=gpu1.pk).update(state=Gpu.State.UNAVAILABLE, state_reason="test: not this one")
    return Gpu.objects.get(pk=gpu0.pk)


def model_like(tiny_model, model_id: str, **fields) -> ModelConfig:
    fields = {"path": tiny_model.path, "on_demand": True, **fields}
    return ModelConfig.objects.create(id=model_id, name=model_id, **fields)


def running(tiny_model, model_id, *, idle_minutes, actor=None, on_demand=True, in_flight=0, **model_fields):
    """A model loaded onto GPU 0 and running for an hour, last used `idle_minutes` ago."""
    model_like(tiny_model, model_id, **model_fields)
    instance = services.request_load(model_id=model_id, gpu_spec="0", actor=actor, on_demand=on_demand)
    now = timezone.now()
    GpuInstance.objects.filter(pk=instance.pk).update(
        status=Status.RUNNING,
        loaded_at=now - timedelta(hours=1),
        last_used_at=now - timedelta(minutes=idle_minutes),
        in_flight=in_flight,
    )
    instance.refresh_from_db()
    return instance


def load_on_demand(model, actor):
    return ondemand._load(model, actor, deadline=time.monotonic() + 5)


def test_a_cold_model_evicts_the_least_recently_used_idle_model(
    one_small_gpu, tiny_model, sent, users, client
):
    recent = running(tiny_model, "recent", idle_minutes=5, actor=users["operator"])
    oldest = running(tiny_model, "oldest", idle_minutes=14, actor=users["operator"])
    third = model_like(tiny_model, "third")

    instance = load_on_demand(third, users["viewer"])

    assert instance.status == Status.PENDING and instance.gpu_ids == "0"
    oldest.refresh_from_db()
    recent.refresh_from_db()
    assert (oldest.status, recent.status) == (Status.STOPPING, Status.RUNNING)
    event = oldest.events.get(kind=InstanceEvent.Kind.EVICTED)
    assert event.reason == "idle_lru" and event.actor_name == "system"
    assert event.detail.startswith(
        f"oldest (#{oldest.pk}, loaded on demand by operator) was unloaded for viewer's request for third on "
        "GPU 0 of testhost: idle 14 min, the least recently used of 2 idle models there; "
    )
    assert event.detail.endswith(" claim freed")
    requested = instance.events.get(kind=InstanceEvent.Kind.REQUESTED).detail
    waiting = f"waiting for room: unloading oldest (#{oldest.pk}) on GPU 0"
    assert waiting in requested and instance.waiting_for == waiting
    client.force_login(users["viewer"])  # the pending card says what it waits for
    assert waiting in client.get("/", HTTP_HX_REQUEST="true").content.decode()
    # the victim's GPU passes to the new load, whose worker stops it first (as a switch does)
    assert not oldest.gpu_links.filter(active=True).exists()


def test_the_same_inputs_choose_the_same_victim(one_small_gpu, tiny_model, sent):
    a = running(tiny_model, "a", idle_minutes=10)
    b = running(tiny_model, "b", idle_minutes=10)
    GpuInstance.objects.filter(pk__in=[a.pk, b.pk]).update(
        last_used_at=timezone.now() - timedelta(minutes=10)
    )
    third = model_like(tiny_model, "third")
    first = making_room.find(third)
    again = making_room.find(third)
    assert first.victim_ids == again.victim_ids == [a.pk]  # equal in every way: the older instance id


def test_a_model_serving_a_request_is_never_evicted(one_small_gpu, tiny_model, sent, users):
    serving = running(tiny_model, "serving", idle_minutes=30, in_flight=1)  # the LRU, but a stream is open
    GpuInstance.objects.filter(pk=serving.pk).update(last_used_at=timezone.now() - timedelta(seconds=5))
    idle = running(tiny_model, "idle", idle_minutes=3)
    load_on_demand(model_like(tiny_model, "third"), users["viewer"])
    serving.refresh_from_db()
    idle.refresh_from_db()
    assert (serving.status, idle.status) == (Status.RUNNING, Status.STOPPING)


def test_nothing_evictable_is_a_503_that_says_why_and_when(one_small_gpu, tiny_model, sent, users):
    by_hand = running(tiny_model, "by-hand", idle_minutes=60, on_demand=False)
    fresh = running(tiny_model, "fresh", idle_minutes=0)
    with pytest.raises(Refused) as refused:
        load_on_demand(model_like(tiny_model, "third"), users["viewer"])
    message = refused.value.message
    assert "nothing may be evicted to make room" in message and refused.value.reason == "no_evictable_model"
    assert f"by-hand (#{by_hand.pk}): loaded by hand without a keep-alive" in message
    assert f"fresh (#{fresh.pk}): used 0 s ago (an eviction needs 60 s idle)" in message
    # the soonest the fresh one may go: about a minute, never the 30 min keep-alive
    assert 50 <= refused.value.retry_after <= 61
    assert GpuInstance.objects.filter(status=Status.STOPPING).count() == 0
    assert not GpuInstance.objects.filter(model_id="third").exists()


def test_a_model_with_keep_alive_zero_stays(one_small_gpu, tiny_model, sent, users):
    running(tiny_model, "never", idle_minutes=60, keep_alive_seconds=0)
    running(tiny_model, "other", idle_minutes=1, on_demand=False)
    with pytest.raises(Refused, match="never unloaded automatically"):
        load_on_demand(model_like(tiny_model, "third"), users["viewer"])


def test_a_load_by_hand_evicts_only_when_asked_and_allowed(one_small_gpu, tiny_model, sent, users):
    theirs = running(tiny_model, "theirs", idle_minutes=20, actor=users["admin"])
    running(tiny_model, "mine", idle_minutes=30, actor=users["operator"], in_flight=1)
    GpuInstance.objects.filter(model_id="mine").update(last_used_at=timezone.now())
    model_like(tiny_model, "third")
    with pytest.raises(Refused, match="does not fit on GPU 0"):
        services.request_load(model_id="third", gpu_spec="0", actor=users["operator"])
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="third", gpu_spec="0", actor=users["operator"], evict=True)
    assert refused.value.status == 403 and f"instance #{theirs.pk} (theirs)" in refused.value.message
    loaded = services.request_load(model_id="third", gpu_spec="0", actor=users["admin"], evict=True)
    theirs.refresh_from_db()
    assert theirs.status == Status.STOPPING and loaded.status == Status.PENDING
    assert "admin's request" in theirs.events.get(kind=InstanceEvent.Kind.EVICTED).detail


def test_the_api_cli_and_auto_placement_may_ask_to_evict(one_small_gpu, tiny_model, sent, users, client):
    from io import StringIO

    from django.core.management import call_command

    idle = running(tiny_model, "idle", idle_minutes=20, actor=users["operator"])
    running(tiny_model, "busy", idle_minutes=20, in_flight=1)
    GpuInstance.objects.filter(model_id="busy").update(last_used_at=timezone.now())
    model_like(tiny_model, "third")
    model_like(tiny_model, "fourth")
    client.force_login(users["operator"])
    refused = client.post("/api/v1/instances/", {"model_id": "third"}, content_type="application/json")
    assert refused.status_code == 409, refused.content
    answer = client.post(
        "/api/v1/instances/", {"model_id": "third", "evict": True}, content_type="application/json"
    )
    assert answer.status_code == 202, answer.content
    idle.refresh_from_db()
    assert idle.status == Status.STOPPING
    assert idle.events.get(kind=InstanceEvent.Kind.EVICTED).reason == "idle_lru"
    # nothing idle is left: the CLI's --evict is refused with the reason
    out = StringIO()
    with pytest.raises(Exception, match="nothing may be evicted to make room"):
        call_command("load", "fourth", "--gpu", "auto", "--evict", stdout=out)


# --- the team policy: pins, borrowed memory, quotas -------------------------------------------------------


def test_a_pin_is_never_broken_to_make_room(one_small_gpu, tiny_model, sent, users):
    from policy.models import Pin

    pinned = running(tiny_model, "pinned", idle_minutes=60)
    Pin.objects.create(instance=pinned, pinned_by=users["admin"], reason="demo at 3")
    running(tiny_model, "serving", idle_minutes=1, in_flight=1)
    GpuInstance.objects.filter(model_id="serving").update(last_used_at=timezone.now())
    with pytest.raises(Refused) as refused:
        load_on_demand(model_like(tiny_model, "third"), users["viewer"])
    assert refused.value.status == 503 and refused.value.message.startswith("pinned_no_room: ")
    assert "demo at 3" in refused.value.message
    pinned.refresh_from_db()
    assert pinned.status == Status.RUNNING


def test_borrowed_memory_is_reclaimed_first_and_a_quota_refuses_with_numbers(
    one_small_gpu, tiny_model, sent, users
):
    from policy.models import Quota

    Quota.objects.create(user=users["operator"], models_loaded=1)
    within = running(tiny_model, "within", idle_minutes=30, actor=users["operator"])
    borrowed = running(tiny_model, "borrowed", idle_minutes=0, actor=users["operator"])  # used just now
    instance = load_on_demand(model_like(tiny_model, "third"), users["admin"])  # admin: no quota
    borrowed.refresh_from_db()
    within.refresh_from_db()
    assert (borrowed.status, within.status) == (Status.STOPPING, Status.RUNNING)
    assert instance.status == Status.PENDING
    # the operator is at her quota (her model busy): a load that needs room made is refused (429) with the
    # numbers, even though the admin's idle model could go
    now = timezone.now()
    GpuInstance.objects.filter(pk=within.pk).update(in_flight=1, last_used_at=now)
    GpuInstance.objects.filter(pk=instance.pk).update(
        status=Status.RUNNING, loaded_at=now - timedelta(hours=1), last_used_at=now - timedelta(hours=1)
    )
    with pytest.raises(Refused) as refused:
        load_on_demand(model_like(tiny_model, "fourth"), users["operator"])
    assert refused.value.status == 429 and refused.value.message.startswith("quota_models: ")


def test_idle_unload_leaves_a_pinned_model(one_small_gpu, tiny_model, sent, users, settings):
    from policy.models import Pin

    settings.KEEP_ALIVE_SECONDS = 60
    pinned = running(tiny_model, "pinned", idle_minutes=60)
    loose = running(tiny_model, "loose", idle_minutes=60)
    Pin.objects.create(instance=pinned, pinned_by=users["admin"])
    assert [i.pk for i in ondemand.unload_idle()] == [loose.pk]


def test_an_eviction_is_a_fact_for_the_alert_rules(one_small_gpu, tiny_model, sent, users):
    from gpus.models import AlertRule
    from models_app.memory import instance_facts

    running(tiny_model, "recent", idle_minutes=5)
    oldest = running(tiny_model, "oldest", idle_minutes=14)
    assert not [f for f in instance_facts("testhost") if f.evicted]  # no eviction rule: not even asked
    AlertRule.objects.create(name="evictions", kind=AlertRule.Kind.INSTANCE_EVICTED, window_minutes=30)
    load_on_demand(model_like(tiny_model, "third"), users["viewer"])
    (facts,) = [f for f in instance_facts("testhost") if f.evicted]
    assert facts.instance_id == oldest.pk
    assert facts.evicted == oldest.events.get(kind=InstanceEvent.Kind.EVICTED).detail


def test_a_switch_is_held_to_the_quota_too(one_small_gpu, tiny_model, sent, users):
    from policy.models import Quota

    Quota.objects.create(user=users["operator"], models_loaded=1, hard=True)
    mine = running(tiny_model, "mine", idle_minutes=5, actor=users["operator"])
    for name in ("other", "third"):
        model_like(tiny_model, name)
    # one model for another: within the quota (the replaced one is on its way out)
    switched = services.request_switch(model_id="other", gpu_spec=mine.gpu_ids, actor=users["operator"])
    # a second model besides the switched one is beyond her hard quota: 429, whatever the memory
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="third", gpu_spec="0", actor=users["operator"], force=True)
    assert refused.value.status == 429 and refused.value.message.startswith("quota_models: ")
    assert switched.status == Status.PENDING


def test_load_on_demand_goes_around_a_gpu_reserved_for_someone_else(live, fake_gpus, tiny_model, sent, users):
    from policy.models import Reservation

    now = timezone.now()
    reservation = Reservation.objects.create(
        host=fake_gpus.host, gpu_indices=[0], start=now - timedelta(minutes=5), end=now + timedelta(hours=1),
        purpose="training run",
    )  # fmt: skip
    reservation.users.add(users["operator2"])
    other = load_on_demand(model_like(tiny_model, "other"), users["viewer"])
    assert other.gpu_ids == "1"  # GPU 0 would have packed best, but it is reserved
    Gpu.objects.filter(pk=fake_gpus.gpus[1].pk).update(state=Gpu.State.UNAVAILABLE, state_reason="test")
    with pytest.raises(Refused):  # only the reserved GPU is left: not for the viewer
        load_on_demand(model_like(tiny_model, "third"), users["viewer"])
    holder = load_on_demand(model_like(tiny_model, "holders"), users["operator2"])
    assert holder.gpu_ids == "0"  # the holder's


def test_the_api_answers_a_quota_refusal_with_its_reason(one_small_gpu, tiny_model, sent, users, client):
    from policy.models import Quota

    Quota.objects.create(user=users["operator"], models_loaded=1, hard=True)
    running(tiny_model, "mine", idle_minutes=5, actor=users["operator"])
    model_like(tiny_model, "second")
    client.force_login(users["operator"])
    answer = client.post(
        "/api/v1/instances/", {"model_id": "second", "gpu_id": "0"}, content_type="application/json"
    )
    assert answer.status_code == 429
    body = answer.json()
    assert body["code"] == "quota" and body["reason"] == "quota_models"
    assert body["detail"].startswith("quota_models: you have 1 of your 1 model(s) loaded")


def test_memory_reserved_on_a_host_is_kept_from_others(one_small_gpu, tiny_model, sent, users):
    from policy.models import Reservation

    now = timezone.now()
    reservation = Reservation.objects.create(
        host=one_small_gpu.host, memory_mib=1000, start=now - timedelta(minutes=1), end=now + timedelta(hours=1),
        purpose="eval batch",
    )  # fmt: skip
    reservation.users.add(users["operator2"])
    model_like(tiny_model, "first")
    model_like(tiny_model, "second")
    # 1400 MiB on GPU 0 (GPU 1 unavailable reports none): 10 foreign + ~500 claimed + 1000 held back > 1400
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="first", gpu_spec="0", actor=users["operator"])
    assert refused.value.status == 409 and refused.value.reason == "reservation"
    assert "1 000 MiB of testhost's GPU memory is reserved for others now" in refused.value.message
    holder = services.request_load(model_id="second", gpu_spec="0", actor=users["operator2"])
    assert holder.status == Status.PENDING
