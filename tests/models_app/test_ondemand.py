"""Load on demand, placement and idle unload (models_app.ondemand, models_app.placement): the gateway's side of
the model lifecycle. The worker is not running here: loads are captured (`sent`) and the tests play the
worker by setting the instance's status."""

import time
from datetime import timedelta
from types import SimpleNamespace

import pytest
from django.contrib.auth.models import AnonymousUser
from django.utils import timezone

from gpus.models import Gpu, Host
from models_app import keepalive, ondemand, placement, tasks
from models_app.errors import Refused
from models_app.models import GpuInstance, InstanceEvent, InstanceGpu, LlamaBinary, ModelConfig
from models_app.placement import choose_gpus
from tests.helpers import callers_at_once, refused

Status = GpuInstance.Status


@pytest.fixture
def host(fake_gpus, tmp_path):
    """testhost with its two simulated GPUs (24564 MiB each), alive, with a default llama-server."""
    host = fake_gpus.host
    Host.objects.filter(pk=host.pk).update(last_seen=timezone.now())
    LlamaBinary.objects.create(
        host=host, name="default", path=str(tmp_path / "llama-server"), is_default=True
    )
    Gpu.objects.filter(host=host).update(memory_used_mib=10, state=Gpu.State.IDLE)
    return host


def gpu(host, index) -> Gpu:
    return Gpu.objects.get(host=host, index=index)


def set_used(host, index, mib, **fields):
    Gpu.objects.filter(host=host, index=index).update(memory_used_mib=mib, **fields)


def add_gpu(host, index, *, total=24564, used=10, **fields) -> Gpu:
    return Gpu.objects.create(
        host=host, index=index, uuid=f"GPU-{host.name}-{index}", name="Simulated", memory_total_mib=total,
        memory_used_mib=used, **fields,
    )  # fmt: skip


def other_model(tiny_model, model_id, **fields) -> ModelConfig:
    return ModelConfig.objects.create(id=model_id, name=model_id, path=tiny_model.path, **fields)


def running(
    model, gpu_row, *, on_demand=True, loaded_ago=0.0, used_ago=None, in_flight=0, owner=None, **fields
):
    """A running instance of `model` on `gpu_row`, as a worker would have left it."""
    now = timezone.now()
    instance = GpuInstance.objects.create(
        model=model, host=gpu_row.host, gpu_ids=str(gpu_row.index), owner=owner,
        loaded_on_demand=on_demand, loaded_at=now - timedelta(seconds=loaded_ago),
        last_used_at=None if used_ago is None else now - timedelta(seconds=used_ago), in_flight=in_flight,
        **{"port": 9000 + gpu_row.index, "status": Status.RUNNING, **fields},
    )  # fmt: skip
    InstanceGpu.objects.create(instance=instance, gpu=gpu_row, position=0)
    return instance


# --- placement -------------------------------------------------------------------------------------------


def test_spread_picks_the_gpu_with_most_free_memory_counting_other_processes(host, tiny_model, settings):
    settings.PLACEMENT = "spread"
    set_used(host, 0, 9000)  # someone's 9 GB process, below the "occupied" state: it still counts
    set_used(host, 1, 2000)
    chosen_host, gpus = choose_gpus(tiny_model)
    assert chosen_host == host and [g.index for g in gpus] == [1]
    add_gpu(host, 2, total=49152, used=30000)  # 19152 MiB free: less than GPU 1's 22564
    assert [g.index for g in choose_gpus(tiny_model)[1]] == [1]
    add_gpu(host, 3, total=49152, used=100)
    assert [g.index for g in choose_gpus(tiny_model)[1]] == [3]


def test_pack_picks_the_gpu_where_the_claim_leaves_least_memory(host, tiny_model):
    set_used(host, 0, 9000)  # someone's 9 GB process: 15564 MiB free, against GPU 1's 22564
    set_used(host, 1, 2000)
    assert [g.index for g in choose_gpus(tiny_model)[1]] == [0]  # GPU 1 stays free for a bigger model
    set_used(host, 0, 24100)  # 464 MiB free: less than tiny's claim (its estimate + 512 MiB headroom)
    assert [g.index for g in choose_gpus(tiny_model)[1]] == [1]


def test_pack_puts_a_model_beside_another_where_it_fits(host, tiny_model, settings):
    gemma = other_model(tiny_model, "gemma3-270m")
    running(gemma, gpu(host, 0), memory_estimate={"per_gpu": [{"estimated_mib": 400}]})
    choices, out = placement.rank(tiny_model)
    assert [c.gpus[0].index for c in choices] == [0, 1] and not out
    assert choices[0].explain().startswith("GPU 0 on testhost: fits beside gemma3-270m on GPU 0, ")
    assert choose_gpus(tiny_model)[1][0].index == 0
    settings.PLACEMENT = "spread"
    assert choose_gpus(tiny_model)[1][0].index == 1
    settings.GPU_SHARING = False  # one model per GPU: GPU 0 is held
    choices, out = placement.rank(tiny_model)
    assert [c.gpus[0].index for c in choices] == [1]
    assert out[0].startswith("GPU 0 on testhost: held by gemma3-270m (instance #")


def test_placement_skips_unavailable_held_and_occupied_gpus(host, tiny_model, settings):
    settings.PLACEMENT = "spread"
    big = add_gpu(host, 2, total=81920, used=0, state=Gpu.State.UNAVAILABLE, state_reason="driver down")
    held = add_gpu(host, 3, total=81920, used=0)
    add_gpu(host, 4, total=81920, used=40000, state=Gpu.State.OCCUPIED_BY_OTHERS)
    running(other_model(tiny_model, "holder"), held)
    set_used(host, 0, 5000)
    assert [g.index for g in choose_gpus(tiny_model)[1]] == [1]
    assert big.pk not in [g.pk for g in choose_gpus(tiny_model)[1]]


def test_placement_skips_dead_hosts_and_hosts_without_llama_server(host, tiny_model, tmp_path):
    dead = Host.objects.create(name="dead", last_seen=timezone.now() - timedelta(minutes=10))
    LlamaBinary.objects.create(host=dead, name="d", path=str(tmp_path / "d"), is_default=True)
    add_gpu(dead, 0, total=81920, used=0)
    nobinary = Host.objects.create(name="nobinary", last_seen=timezone.now())
    LlamaBinary.objects.create(
        host=nobinary, name="b", path=str(tmp_path / "b"), is_default=True, error="bad"
    )
    add_gpu(nobinary, 0, total=81920, used=0)
    never = Host.objects.create(name="never")  # registered, never heard of
    add_gpu(never, 0, total=81920, used=0)
    chosen_host, gpus = choose_gpus(tiny_model)
    assert chosen_host == host
    with refused("busy", match="no live worker"):
        choose_gpus(tiny_model, host=dead)


def test_no_capacity_names_busy_gpus_and_what_keeps_them_busy(host, tiny_model, users):
    gemma = other_model(tiny_model, "gemma")
    instance = running(gemma, gpu(host, 0), loaded_ago=60, used_ago=10)
    set_used(
        host,
        1,
        24400,
        state=Gpu.State.OCCUPIED_BY_OTHERS,
        processes=[{"pid": 4242, "name": "train.py", "used_mib": 19990, "owner": "foreign"}],
    )  # fmt: skip (164 MiB left: too little for any model beside train.py)
    add_gpu(host, 2, state=Gpu.State.UNAVAILABLE, state_reason="fell off the bus")
    with refused("busy") as caught:
        choose_gpus(tiny_model)
    message = caught.value.message
    assert f"GPU 0 on testhost: gemma (instance #{instance.pk}, running)" in message
    assert "GPU 1 on testhost: other processes: train.py (pid 4242, 19990 MiB) (needs ≈ " in message
    assert "MiB, 164 MiB free)" in message
    assert "GPU 2 on testhost: unavailable (fell off the bus)" in message
    # The soonest idle unload: gemma's default keep-alive (1800 s) from its last use 10 s ago.
    assert 1780 <= caught.value.retry_after <= 1791
    assert caught.value.code == "busy" and caught.value.field == "gpu_id"  # the gateway answers 503
    # ensure_running says the same, and creates nothing.
    with refused("busy", match="train.py"):
        ondemand.ensure_running(tiny_model, users["operator"], timeout=1)
    assert not GpuInstance.objects.filter(model=tiny_model).exists()


def test_a_gpu_being_unloaded_is_waited_for_not_refused(host, tiny_model, users, sent, monkeypatch):
    """Ollama clients swap models: keep_alive 0 on one, then a request for another. The second waits for
    the GPU the first frees instead of answering 503."""
    Gpu.objects.filter(host=host, index=1).update(state=Gpu.State.UNAVAILABLE)
    old = running(other_model(tiny_model, "old"), gpu(host, 0), status=Status.STOPPING)
    with refused("busy") as caught:
        choose_gpus(tiny_model)
    assert caught.value.freeing and caught.value.retry_after <= 11  # the stop timeout (10 s)

    def worker_sleep(seconds):  # plays the worker: the old process stops, its GPU is released
        GpuInstance.objects.filter(pk=old.pk).update(status=Status.STOPPED)
        InstanceGpu.objects.filter(instance=old).update(active=False)

    monkeypatch.setattr(ondemand, "time", SimpleNamespace(monotonic=time.monotonic, sleep=worker_sleep))
    with refused("timeout"):  # (nobody plays the load's worker: the wait for it ends)
        ondemand.ensure_running(tiny_model, users["operator"], timeout=0.5)
    assert GpuInstance.objects.get(model=tiny_model).gpu_ids == "0"


def test_no_capacity_without_any_host(db, tiny_model):
    with refused("busy", match="no GPU to load tiny on: any host has no live worker"):
        choose_gpus(tiny_model)


# --- ensure_running ----------------------------------------------------------------------------------------


def test_a_running_instance_is_returned_at_once_to_any_role(host, tiny_model, users, sent):
    instance = running(tiny_model, gpu(host, 1), on_demand=False)
    for name in ("viewer", "operator", "admin"):
        assert ondemand.ensure_running(tiny_model, users[name]).pk == instance.pk
    assert sent == []


def test_operator_loads_on_demand_through_the_services(
    host, tiny_model, users, sent, monkeypatch, django_capture_on_commit_callbacks
):
    set_used(host, 0, 24100)  # too little left for tiny's claim
    calls = []

    def worker_sleep(seconds):  # plays the worker: the load becomes ready while the caller waits
        calls.append(seconds)
        GpuInstance.objects.filter(model=tiny_model).update(status=Status.RUNNING, loaded_at=timezone.now())

    monkeypatch.setattr(ondemand, "time", SimpleNamespace(monotonic=time.monotonic, sleep=worker_sleep))
    with django_capture_on_commit_callbacks(execute=True):
        instance = ondemand.ensure_running(tiny_model, users["operator"], keep_alive_seconds=120)
    assert instance.status == Status.RUNNING and calls
    assert instance.loaded_on_demand and instance.gpu_ids == "1" and instance.owner == users["operator"]
    assert instance.keep_alive_seconds == 120
    assert [(name, args) for name, args, _ in sent] == [("load_model", [instance.pk])]
    event = instance.events.get(kind=InstanceEvent.Kind.REQUESTED)
    assert event.actor_name == "operator" and event.detail == "load tiny on testhost GPU 1 on demand"


@pytest.mark.parametrize(
    ("who", "model_fields", "status"),
    [
        ("viewer", {}, 403),  # not on demand: only operators wake it
        ("outsider", {"on_demand": True}, 403),  # no role at all
        ("anonymous", {"on_demand": True}, 401),
        ("anonymous", {"allow_anonymous": True}, 401),  # may use it when loaded, not wake it
    ],
)
def test_who_may_not_wake_a_model(host, tiny_model, users, sent, who, model_fields, status):
    ModelConfig.objects.filter(pk=tiny_model.pk).update(**model_fields)
    tiny_model.refresh_from_db()
    actor = AnonymousUser() if who == "anonymous" else users[who]
    with pytest.raises(Refused) as caught:
        ondemand.ensure_running(tiny_model, actor, timeout=1)
    assert caught.value.status == status
    assert not GpuInstance.objects.exists() and sent == []


def test_anonymous_may_use_a_loaded_model_only_where_allowed(host, tiny_model, users):
    instance = running(tiny_model, gpu(host, 0), on_demand=False)
    with pytest.raises(Refused) as caught:
        ondemand.ensure_running(tiny_model, AnonymousUser())
    assert caught.value.status == 401
    with pytest.raises(Refused) as caught:
        ondemand.ensure_running(tiny_model, users["outsider"])
    assert caught.value.status == 403
    tiny_model.allow_anonymous = True
    assert ondemand.ensure_running(tiny_model, AnonymousUser()).pk == instance.pk


@pytest.mark.parametrize("who", ["viewer", "anonymous"])
def test_on_demand_models_wake_for_anyone_allowed_to_use_them(host, tiny_model, users, sent, who):
    ModelConfig.objects.filter(pk=tiny_model.pk).update(on_demand=True, allow_anonymous=who == "anonymous")
    tiny_model.refresh_from_db()
    actor = AnonymousUser() if who == "anonymous" else users[who]
    with refused("timeout"):  # nobody plays the worker: the wait ends, the load goes on
        ondemand.ensure_running(tiny_model, actor, timeout=0.3)
    instance = GpuInstance.objects.get(model=tiny_model)
    assert instance.loaded_on_demand and instance.status == Status.PENDING
    event = instance.events.get(kind=InstanceEvent.Kind.REQUESTED)
    if who == "anonymous":
        assert instance.owner is None and event.actor_name == "system"
        assert event.detail.endswith("on demand (anonymous request)")
    else:
        assert instance.owner == users["viewer"] and event.actor_name == "viewer"


def test_a_load_under_way_is_waited_for_not_repeated(host, tiny_model, users, sent, monkeypatch):
    from models_app.services import request_load

    pending = request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])  # by hand, starting

    def worker_sleep(seconds):
        GpuInstance.objects.filter(pk=pending.pk).update(status=Status.RUNNING)

    monkeypatch.setattr(ondemand, "time", SimpleNamespace(monotonic=time.monotonic, sleep=worker_sleep))
    # A viewer may wait for a load under way (anyone may use a loaded model): no second load.
    assert ondemand.ensure_running(tiny_model, users["viewer"]).pk == pending.pk
    assert GpuInstance.objects.count() == 1


def test_load_failed_carries_the_error(host, tiny_model, users, sent, monkeypatch):
    def worker_sleep(seconds):
        GpuInstance.objects.filter(model=tiny_model).update(
            status=Status.FAILED, error="llama-server exited with code 1: unknown model architecture 'x'"
        )

    monkeypatch.setattr(ondemand, "time", SimpleNamespace(monotonic=time.monotonic, sleep=worker_sleep))
    with refused("load_failed") as caught:
        ondemand.ensure_running(tiny_model, users["operator"])
    assert caught.value.status == 503
    assert "loading tiny failed: llama-server exited with code 1: unknown model architecture 'x'" in (
        caught.value.message
    )


def test_a_recent_failure_is_answered_without_another_load(host, tiny_model, users, sent, monkeypatch):
    def worker_sleep(seconds):
        GpuInstance.objects.filter(model=tiny_model, status=Status.PENDING).update(
            status=Status.FAILED, error="out of memory", stopped_at=timezone.now()
        )

    monkeypatch.setattr(ondemand, "time", SimpleNamespace(monotonic=time.monotonic, sleep=worker_sleep))
    with refused("load_failed", match="out of memory"):
        ondemand.ensure_running(tiny_model, users["operator"])
    with refused(
        "load_failed", match=r"loading tiny failed 0 s ago \(instance #\d+\): out of memory"
    ) as caught:
        ondemand.ensure_running(tiny_model, users["operator"])
    assert 1 <= caught.value.retry_after <= 30
    assert GpuInstance.objects.filter(model=tiny_model).count() == 1  # no second load
    GpuInstance.objects.update(stopped_at=timezone.now() - timedelta(seconds=31))
    with refused("load_failed", match="out of memory"):  # tried again (and failed again)
        ondemand.ensure_running(tiny_model, users["operator"])
    assert GpuInstance.objects.filter(model=tiny_model).count() == 2


def test_a_load_on_demand_stranded_on_a_down_host_is_answered_503_not_loaded_twice(
    host, tiny_model, users, sent, settings
):
    other = Host.objects.create(name="box-2", last_seen=timezone.now() - timedelta(seconds=600))
    stranded = running(tiny_model, add_gpu(other, 0), status=Status.UNKNOWN)
    with refused(
        "load_failed", match=r"tiny is loaded on host box-2 \(instance #\d+\), which is down"
    ) as caught:
        ondemand.ensure_running(tiny_model, users["operator"])
    assert "clear_host box-2 --retire" in caught.value.message
    assert caught.value.retry_after == settings.HOST_TIMEOUT_SECONDS
    assert list(GpuInstance.objects.filter(model=tiny_model)) == [stranded]  # nothing loaded elsewhere


def test_timeout_leaves_the_load_going(host, tiny_model, users, sent):
    started = time.monotonic()
    with refused("timeout", match="tiny is still pending") as caught:
        ondemand.ensure_running(tiny_model, users["operator"], timeout=0.3)
    assert time.monotonic() - started < 5
    assert caught.value.retry_after and caught.value.status == 503
    assert GpuInstance.objects.get(model=tiny_model).status == Status.PENDING


def test_the_default_wait_is_the_setting(host, tiny_model, users, sent, settings):
    settings.GATEWAY_LOAD_TIMEOUT_SECONDS = 0.2
    with refused("timeout"):
        ondemand.ensure_running(tiny_model, users["operator"])


@pytest.mark.django_db(transaction=True)
def test_concurrent_callers_share_one_load(host, tiny_model, users, sent):
    """Eight real threads ask for a cold model at once: exactly one instance, one load task, all get it."""
    callers = 8
    threads, results, errors = callers_at_once(tiny_model, users["operator"], callers, timeout=20)
    deadline = time.monotonic() + 20
    while not GpuInstance.objects.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.5)  # every caller has seen the load by now, or lost the race for the GPU
    GpuInstance.objects.update(status=Status.RUNNING, loaded_at=timezone.now())  # the worker's part
    for thread in threads:
        thread.join(30)
    assert errors == []
    instance = GpuInstance.objects.get()
    assert results == [instance.pk] * callers
    assert [name for name, _, _ in sent] == ["load_model"]
    assert instance.events.filter(kind=InstanceEvent.Kind.REQUESTED).count() == 1


def test_the_database_refuses_a_second_load_on_demand_of_a_model(host, tiny_model):
    from django.db import IntegrityError, transaction

    running(tiny_model, gpu(host, 0))
    with pytest.raises(IntegrityError), transaction.atomic():
        GpuInstance.objects.create(model=tiny_model, host=host, gpu_ids="1", loaded_on_demand=True)
    # A load by hand of the same model is a different matter.
    GpuInstance.objects.create(model=tiny_model, host=host, gpu_ids="1", loaded_on_demand=False)


# --- in flight, keep-alive ---------------------------------------------------------------------------------


def test_request_started_and_finished_count_and_never_go_below_zero(host, tiny_model):
    instance = running(tiny_model, gpu(host, 0))
    assert keepalive.request_started(instance.pk) is True
    assert keepalive.request_started(instance.pk) is True
    instance.refresh_from_db()
    assert instance.in_flight == 2 and instance.last_used_at is not None
    for _ in range(4):
        keepalive.request_finished(instance.pk)
    instance.refresh_from_db()
    assert instance.in_flight == 0
    GpuInstance.objects.filter(pk=instance.pk).update(status=Status.STOPPING)
    assert keepalive.request_started(instance.pk) is False  # lost to an unload: look again
    instance.refresh_from_db()
    assert instance.in_flight == 0


def test_keep_alive_is_clamped_to_the_admin_limit(host, tiny_model, settings):
    settings.GATEWAY_MAX_KEEP_ALIVE_SECONDS = 3600
    instance = running(tiny_model, gpu(host, 0))
    for asked, kept in [(300, 300), (10**9, 3600), (-1, 3600), (0, 0), (2.7, 2)]:
        keepalive.request_started(instance.pk, keep_alive_seconds=asked)
        instance.refresh_from_db()
        assert instance.keep_alive_seconds == kept, asked


def test_expires_at(host, tiny_model, settings):
    settings.KEEP_ALIVE_SECONDS = 1800
    instance = running(tiny_model, gpu(host, 0), loaded_ago=100)
    assert keepalive.expires_at(instance) == instance.loaded_at + timedelta(seconds=1800)
    keepalive.request_started(instance.pk, keep_alive_seconds=60)
    keepalive.request_finished(instance.pk)
    instance.refresh_from_db()
    assert keepalive.expires_at(instance) == instance.last_used_at + timedelta(seconds=60)
    by_hand = running(other_model(tiny_model, "byhand"), gpu(host, 1), on_demand=False)
    assert keepalive.expires_at(by_hand) is None


# --- idle unload -------------------------------------------------------------------------------------------


def test_idle_unload_picks_the_right_instances(
    host, tiny_model, users, sent, settings, django_capture_on_commit_callbacks
):
    settings.KEEP_ALIVE_SECONDS = 1800
    settings.GATEWAY_MAX_REQUEST_SECONDS = 3600
    for index in range(2, 10):
        add_gpu(host, index)
    minutes = 60

    def model(name, **fields):
        return other_model(tiny_model, name, **fields)

    idle = running(model("idle"), gpu(host, 0), loaded_ago=2 * 3600, used_ago=31 * minutes)
    never_used = running(model("never-used"), gpu(host, 1), loaded_ago=45 * minutes)
    recent = running(model("recent"), gpu(host, 2), loaded_ago=2 * 3600, used_ago=5 * minutes)
    busy = running(model("busy"), gpu(host, 3), loaded_ago=2 * 3600, used_ago=40 * minutes, in_flight=1)
    stale = running(model("stale"), gpu(host, 4), loaded_ago=3 * 3600, used_ago=2 * 3600, in_flight=2)
    by_hand = running(model("by-hand"), gpu(host, 5), on_demand=False, loaded_ago=9 * 3600)
    by_hand_kept = running(
        model("registry-ka", keep_alive_seconds=600), gpu(host, 6), on_demand=False, loaded_ago=3600
    )
    forever = running(model("forever", keep_alive_seconds=0), gpu(host, 7), loaded_ago=9 * 3600)
    asked_short = running(
        model("asked-short"), gpu(host, 8), loaded_ago=3600, used_ago=2 * minutes, keep_alive_seconds=60
    )

    with django_capture_on_commit_callbacks(execute=True):
        unloaded = tasks.unload_idle()  # the beat task, called as a function

    assert unloaded == 5
    stopping = set(GpuInstance.objects.filter(status=Status.STOPPING).values_list("pk", flat=True))
    assert stopping == {idle.pk, never_used.pk, stale.pk, by_hand_kept.pk, asked_short.pk}
    for kept in (recent, busy, by_hand, forever):
        kept.refresh_from_db()
        assert kept.status == Status.RUNNING
    details = dict(
        InstanceEvent.objects.filter(kind=InstanceEvent.Kind.IDLE_UNLOAD).values_list("instance_id", "detail")
    )
    assert details[idle.pk] == "idle for 31 min (keep-alive 30 min)"
    assert details[never_used.pk] == "idle for 45 min (keep-alive 30 min)"
    assert details[by_hand_kept.pk] == "idle for 60 min (keep-alive 10 min)"
    assert details[asked_short.pk] == "idle for 2 min (keep-alive 60 s)"
    assert details[stale.pk].startswith("idle for 2 h (keep-alive 30 min); 2 in-flight request(s) ignored")
    assert InstanceEvent.objects.get(instance=idle, kind="idle_unload").actor_name == "system"
    assert sorted(args[0] for name, args, _ in sent if name == "unload_model") == sorted(stopping)
    assert tasks.unload_idle() == 0  # nothing twice


def test_idle_unload_rechecks_under_the_lock(host, tiny_model, sent, settings):
    """A request that started after the candidates were read keeps its instance."""
    settings.KEEP_ALIVE_SECONDS = 60
    instance = running(tiny_model, gpu(host, 0), loaded_ago=600)
    now = timezone.now()
    keepalive.request_started(instance.pk)
    assert ondemand._unload_if_idle(instance.pk, now) is None
    instance.refresh_from_db()
    assert instance.status == Status.RUNNING


def test_idle_check_is_scheduled_with_expiry(settings):
    entry = settings.CELERY_BEAT_SCHEDULE["unload-idle"]
    assert entry["task"] == "models_app.tasks.unload_idle"
    assert entry["options"]["expires"] < entry["schedule"]


# --- keep_alive: 0 -----------------------------------------------------------------------------------------


def test_unload_now_follows_operator_rules(host, tiny_model, users, sent):
    instance = running(tiny_model, gpu(host, 0), owner=users["operator"])
    for who in ("viewer", "operator2"):
        with pytest.raises(Refused) as caught:
            ondemand.unload_now(tiny_model, users[who])
        assert caught.value.status == 403
    with pytest.raises(Refused) as caught:
        ondemand.unload_now(tiny_model, AnonymousUser())
    assert caught.value.status == 401
    instance.refresh_from_db()
    assert instance.status == Status.RUNNING
    assert [i.pk for i in ondemand.unload_now(tiny_model, users["operator"])] == [instance.pk]
    instance.refresh_from_db()
    assert instance.status == Status.STOPPING
    event = instance.events.get(kind="unload_requested")
    assert event.actor_name == "operator" and "keep_alive 0" in event.detail
    assert ondemand.unload_now(other_model(tiny_model, "cold"), users["admin"]) == []


# --- the registry fields: YAML import, API, admin ----------------------------------------------------------


def test_yaml_import_reads_the_gateway_fields(db, tiny_model, tmp_path):
    import yaml

    from models_app.importer import ImportRejected, import_registry

    def entry(**parameters):
        return {"id": "gw", "name": "GW", "path": tiny_model.path, "parameters": parameters}

    path = tmp_path / "models.yaml"
    path.write_text(
        yaml.safe_dump({"models": [entry(on_demand=True, keep_alive="1h30m", allow_anonymous=True)]})
    )
    import_registry(path)
    model = ModelConfig.objects.get(pk="gw")
    assert (model.on_demand, model.keep_alive_seconds, model.allow_anonymous) == (True, 5400, True)
    for value, seconds in [(600, 600), ("45s", 45), ("0", 0), (-1, 0), (None, None)]:
        path.write_text(yaml.safe_dump({"models": [entry(keep_alive=value)]}))
        import_registry(path)
        model.refresh_from_db()
        assert model.keep_alive_seconds == seconds, value
        assert not model.on_demand and not model.allow_anonymous  # absent: the defaults
    for bad in [
        {"keep_alive": "soon"},
        {"keep_alive": True},
        {"on_demand": "yes"},
        {"keep_alive": "999999h"},
    ]:
        path.write_text(yaml.safe_dump({"models": [entry(**bad)]}))
        with pytest.raises(ImportRejected, match=r"entry 1 \(gw\): (keep_alive|on_demand)"):
            import_registry(path)


def test_api_shows_and_changes_the_gateway_fields(users, tiny_model, fake_gpus):
    from rest_framework.test import APIClient

    client = APIClient()
    client.force_login(users["admin"])
    response = client.patch(
        "/api/v1/models/tiny/",
        {"on_demand": True, "keep_alive_seconds": 900, "allow_anonymous": True},
        format="json",
    )
    assert response.status_code == 200, response.content
    body = response.json()
    assert (body["on_demand"], body["keep_alive_seconds"], body["allow_anonymous"]) == (True, 900, True)
    assert client.patch("/api/v1/models/tiny/", {"keep_alive_seconds": -5}, format="json").status_code == 400
    instance = running(tiny_model, fake_gpus.gpus[0], loaded_ago=60)
    shown = client.get(f"/api/v1/instances/{instance.pk}/").json()
    assert shown["loaded_on_demand"] is True and shown["in_flight"] == 0
    assert shown["expires_at"] is not None and "api_key" not in shown


def test_admin_edits_the_gateway_fields(client, users, tiny_model):
    from models_app.admin import ModelConfigForm

    assert {"on_demand", "keep_alive_seconds", "allow_anonymous"} <= set(ModelConfigForm.base_fields)
    client.force_login(users["admin"])
    page = client.get(f"/admin/models_app/modelconfig/{tiny_model.pk}/change/").content.decode()
    assert (
        'name="on_demand"' in page
        and 'name="keep_alive_seconds"' in page
        and 'name="allow_anonymous"' in page
    )


# --- the dashboard card ------------------------------------------------------------------------------------


def test_dashboard_card_says_how_to_use_the_model_through_the_gateway(
    client, users, host, tiny_model, settings
):
    import html

    settings.KEEP_ALIVE_SECONDS = 1800
    settings.ALLOWED_HOSTS = ["gpu.example.org"]
    instance = running(tiny_model, gpu(host, 0), loaded_ago=60, port=18123)
    by_hand = running(other_model(tiny_model, "byhand"), gpu(host, 1), on_demand=False, port=18124)
    client.force_login(users["viewer"])
    page = html.unescape(client.get("/", HTTP_HOST="gpu.example.org").content.decode())
    assert "http://gpu.example.org/v1" in page
    assert (
        'curl http://gpu.example.org/v1/chat/completions \\\n  -H "Authorization: Bearer $LC_TOKEN" \\\n'
        '  -H "Content-Type: application/json" \\\n  -d \'{"model": "tiny", "messages": '
        '[{"role": "user", "content": "Hello"}]}\''
    ) in page
    assert '"model": "byhand"' in page
    assert "18123" not in page and "18124" not in page  # the internal port is not for people
    expires = timezone.localtime(instance.loaded_at + timedelta(seconds=1800))
    assert "Loaded on demand, unloads after 30 min idle" in page and f"(at {expires:%H:%M})" in page
    assert page.count("unloads after") == 1  # the one loaded by hand stays, and says nothing
    ModelConfig.objects.filter(pk="byhand").update(keep_alive_seconds=600)
    page = html.unescape(client.get("/", HTTP_HOST="gpu.example.org").content.decode())
    assert "Unloads after 10 min idle" in page
    assert by_hand.pk


def test_dashboard_says_which_models_went_away_for_idleness(
    client, users, host, tiny_model, sent, settings, django_capture_on_commit_callbacks
):
    import html

    settings.KEEP_ALIVE_SECONDS = 1800
    instance = running(tiny_model, gpu(host, 0), loaded_ago=3600, used_ago=31 * 60)
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.unload_idle() == 1
    client.force_login(users["viewer"])
    page = html.unescape(client.get("/").content.decode())
    assert f"Tiny test llama (#{instance.pk}, GPU 0) was unloaded" in page
    assert "ago: idle for 31 min (keep-alive 30 min)." in page


def test_the_dashboards_idle_unloads_are_found_by_kind_not_wording(
    client, users, host, tiny_model, sent, settings, monkeypatch, django_capture_on_commit_callbacks
):
    """Reworded, an idle unload still shows; an unload by the system that merely reads alike does not."""
    import html

    from models_app import services

    settings.KEEP_ALIVE_SECONDS = 1800
    monkeypatch.setattr(ondemand, "IDLE_EVENT_PREFIX", "unused for ")
    instance = running(tiny_model, gpu(host, 0), loaded_ago=3600, used_ago=31 * 60)
    other = running(other_model(tiny_model, "other"), gpu(host, 1), loaded_ago=60, used_ago=10)
    with django_capture_on_commit_callbacks(execute=True):
        assert tasks.unload_idle() == 1
        services.request_unload(instance=other, actor=None, detail="idle for ever (by hand)")
    assert InstanceEvent.objects.get(instance=instance).kind == InstanceEvent.Kind.IDLE_UNLOAD
    client.force_login(users["viewer"])
    page = html.unescape(client.get("/").content.decode())
    assert f"(#{instance.pk}, GPU 0) was unloaded" in page
    assert "ago: unused for 31 min (keep-alive 30 min)." in page
    assert f"#{other.pk}, GPU 1) was unloaded" not in page and "idle for ever" not in page
