"""The service layer: validation, permissions, the GPU claim and what gets queued."""

import pytest
from django.utils import timezone

from gpus.models import Gpu, Host
from models_app import services
from models_app.errors import Refused
from models_app.models import GpuInstance, InstanceEvent, InstanceGpu, ModelConfig
from models_app.services import parse_gpu_spec

Status = GpuInstance.Status
Kind = InstanceEvent.Kind


@pytest.mark.parametrize(("spec", "ids"), [("0", [0]), ("0,1", [0, 1]), (" 1 , 0 ", [1, 0]), (3, [3])])
def test_lifecycle_parse_gpu_spec(spec, ids):
    assert parse_gpu_spec(spec) == ids


@pytest.mark.parametrize(
    ("spec", "says"),
    [
        ("", "no GPU"),
        (None, "no GPU"),
        ("0,,1", "empty entry"),
        ("0,", "empty entry"),
        ("-1", "negative"),
        ("a", "not a number"),
        ("1.5", "not a number"),
        ("²", "not a number"),
        ("0,0", "listed twice"),
    ],
)
def test_lifecycle_parse_gpu_spec_refuses(spec, says):
    with pytest.raises(Refused) as refused:
        parse_gpu_spec(spec)
    assert refused.value.field == "gpu_id"
    assert refused.value.code == "invalid"
    assert says in refused.value.message


def test_lifecycle_request_load_creates_pending_and_queues(
    fake_gpus, tiny_model, users, sent, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True):
        instance = services.request_load(model_id="tiny", gpu_spec="1,0", actor=users["operator"])
    assert instance.status == Status.PENDING
    assert instance.gpu_ids == "1,0"
    assert instance.owner == users["operator"]
    links = list(instance.gpu_links.order_by("position").values_list("gpu__index", "active"))
    assert links == [(1, True), (0, True)]
    assert sent == [
        (
            "load_model",
            [instance.pk],
            {"queue": "host.testhost", "retry": True, "retry_policy": sent[0][2]["retry_policy"]},
        )
    ]
    event = instance.events.get()
    assert (event.kind, event.actor_name) == (Kind.REQUESTED, "operator")


def test_lifecycle_request_load_as_system(fake_gpus, tiny_model, sent):
    instance = services.request_load(model_id="tiny", gpu_spec="0", actor=None)
    assert instance.owner is None
    assert instance.events.get().actor_name == "system"


@pytest.mark.parametrize(
    ("kwargs", "field", "says"),
    [
        ({"model_id": "nope", "gpu_spec": "0"}, "model_id", "unknown model"),
        ({"model_id": "tiny", "gpu_spec": "7"}, "gpu_id", "unknown GPU 7"),
        ({"model_id": "tiny", "gpu_spec": "x"}, "gpu_id", "not a number"),
        ({"model_id": "tiny", "gpu_spec": "0", "host_name": "elsewhere"}, "host", "unknown host"),
    ],
)
def test_lifecycle_request_load_validation(fake_gpus, tiny_model, users, kwargs, field, says):
    with pytest.raises(Refused) as refused:
        services.request_load(actor=users["admin"], **kwargs)
    assert (refused.value.field, refused.value.code) == (field, "invalid")
    assert says in refused.value.message
    assert not GpuInstance.objects.exists()


def test_lifecycle_request_load_missing_model_file(fake_gpus, tiny_model, settings):
    tiny_model.path = str(settings.MODEL_DIRS[0] / "gone.gguf")
    tiny_model.save()
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="tiny", gpu_spec="0", actor=None)
    assert refused.value.field == "model_id"
    assert "file not found" in refused.value.message


def test_lifecycle_request_load_hosts(fake_gpus, tiny_model):
    other = Host.objects.create(name="other", last_seen=timezone.now())  # its worker's heartbeat: up
    Gpu.objects.create(host=other, index=0, uuid="GPU-other-0", name="x", memory_total_mib=100)
    # GPU 0 exists on both hosts: the host must be named.
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="tiny", gpu_spec="0", actor=None)
    assert refused.value.field == "host"
    assert services.request_load(model_id="tiny", gpu_spec="0", actor=None, host_name="other").host == other
    # GPU 1 only on testhost; "0,1" is complete only there.
    assert services.request_load(model_id="tiny", gpu_spec="1", actor=None).host == fake_gpus.host
    Gpu.objects.create(host=other, index=2, uuid="GPU-other-2", name="x", memory_total_mib=100)
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="tiny", gpu_spec="1,2", actor=None)
    assert refused.value.field == "gpu_id"
    assert "not on one host" in refused.value.message


@pytest.mark.parametrize("who", ["viewer", "outsider"])
def test_lifecycle_request_load_forbidden(fake_gpus, tiny_model, users, who):
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="tiny", gpu_spec="0", actor=users[who])
    assert refused.value.code == "forbidden"
    assert not GpuInstance.objects.exists()


def test_lifecycle_request_load_busy(fake_gpus, tiny_model, users, settings):
    first = services.request_load(model_id="tiny", gpu_spec="0,1", actor=users["operator"])
    with pytest.raises(Refused) as refused:  # the same model twice on one GPU
        services.request_load(model_id="tiny", gpu_spec="1", actor=users["operator2"])
    assert (refused.value.code, refused.value.status) == ("busy", 409)
    assert refused.value.message == (
        f"tiny already runs on GPU 1 on testhost (instance #{first.pk} (tiny, pending)); "
        "a second copy on the same GPUs needs force"
    )
    ModelConfig.objects.create(id="other", name="other", path=tiny_model.path)
    settings.GPU_SHARING = False  # one model per GPU, as before sharing
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="other", gpu_spec="1", actor=users["operator2"])
    assert "GPU busy" in refused.value.message and f"#{first.pk}" in refused.value.message
    assert GpuInstance.objects.count() == 1


def test_lifecycle_a_second_copy_is_admitted_only_when_forced(fake_gpus, tiny_model):
    """The database lets several instances hold a GPU; admission decides, and force keeps its meaning."""
    services.request_load(model_id="tiny", gpu_spec="0", actor=None)
    second = services.request_load(model_id="tiny", gpu_spec="0", actor=None, force=True)
    assert InstanceGpu.objects.filter(gpu=fake_gpus.gpus[0], active=True).count() == 2
    assert "(forced: a second copy of tiny on GPU 0 on testhost)" in second.events.get().detail


def test_lifecycle_request_load_broker_down(fake_gpus, tiny_model, settings):
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:1/0"
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="tiny", gpu_spec="0", actor=None)
    assert refused.value.code == "unavailable"
    assert not GpuInstance.objects.exists()
    assert not InstanceEvent.objects.exists()


def test_lifecycle_failed_enqueue_marks_failed(
    fake_gpus, tiny_model, monkeypatch, django_capture_on_commit_callbacks
):
    from utilities import dispatch

    def broken(*args, **kwargs):
        raise ConnectionError("broker went away")

    monkeypatch.setattr(dispatch, "publish", broken)
    with django_capture_on_commit_callbacks(execute=True):
        instance = services.request_load(model_id="tiny", gpu_spec="0", actor=None)
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert "could not queue the load" in instance.error
    assert not instance.gpu_links.filter(active=True).exists()


def test_lifecycle_unload_permissions(fake_gpus, tiny_model, users, sent, django_capture_on_commit_callbacks):
    mine = services.request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    for who in ("operator2", "viewer", "outsider"):
        with pytest.raises(Refused) as refused:
            services.request_unload(instance=mine, actor=users[who])
        assert refused.value.code == "forbidden"
    with django_capture_on_commit_callbacks(execute=True):
        services.request_unload(instance=mine, actor=users["operator"])
    mine.refresh_from_db()
    assert mine.status == Status.STOPPING
    assert ("unload_model", [mine.pk, users["operator"].pk]) == sent[-1][:2]
    assert mine.events.filter(kind=Kind.UNLOAD_REQUESTED, actor_name="operator").exists()
    # Asking again while it stops is fine; the GPU is still held until it has stopped.
    assert services.request_unload(instance=mine, actor=users["admin"]).status == Status.STOPPING
    assert mine.gpu_links.get().active

    theirs = services.request_load(model_id="tiny", gpu_spec="1", actor=users["operator2"])
    services.request_unload(instance=theirs, actor=users["admin"])  # admins manage everything
    system = GpuInstance.objects.create(
        model=tiny_model, host=fake_gpus.host, gpu_ids="1", status=Status.STOPPED
    )
    with pytest.raises(Refused) as refused:
        services.request_unload(instance=system, actor=None)
    assert "not loaded" in refused.value.message


def test_lifecycle_unload_gpus(fake_gpus, tiny_model, users):
    with pytest.raises(Refused) as refused:
        services.request_unload_gpus(gpu_spec="0", actor=None)
    assert refused.value.code == "not_found"
    loaded = services.request_load(model_id="tiny", gpu_spec="0,1", actor=users["operator"])
    with pytest.raises(Refused):
        services.request_unload_gpus(gpu_spec="1", actor=users["operator2"])
    assert [i.pk for i in services.request_unload_gpus(gpu_spec="1", actor=users["operator"])] == [loaded.pk]


def test_lifecycle_switch_hands_gpus_over(
    fake_gpus, tiny_model, users, sent, django_capture_on_commit_callbacks
):
    old = services.request_load(model_id="tiny", gpu_spec="0,1", actor=users["operator"])
    with pytest.raises(Refused) as refused:
        services.request_switch(model_id="tiny", gpu_spec="0", actor=users["operator2"])
    assert refused.value.code == "forbidden"
    with django_capture_on_commit_callbacks(execute=True):
        new = services.request_switch(model_id="tiny", gpu_spec="0", actor=users["operator"])
    old.refresh_from_db()
    assert old.status == Status.STOPPING
    assert not old.gpu_links.filter(active=True).exists()
    assert new.status == Status.PENDING
    assert list(new.gpu_links.values_list("gpu__index", "active")) == [(0, True)]
    assert old.events.filter(kind=Kind.SWITCH_REQUESTED).exists()
    assert new.events.filter(kind=Kind.SWITCH_REQUESTED).exists()
    assert sent[-1][:2] == ("load_model", [new.pk])
    # GPU 1 was freed with the old instance.
    assert services.request_load(model_id="tiny", gpu_spec="1", actor=None).status == Status.PENDING


def test_lifecycle_kill_orphan_service(fake_gpus, users, sent):
    gpu = fake_gpus.gpus[0]
    gpu.processes = [
        {"pid": 1234, "name": "llama-server", "used_mib": 1, "owner": "orphan", "instance_id": None}
    ]
    gpu.save()
    with pytest.raises(Refused) as refused:
        services.kill_orphan(gpu=gpu, pid=1234, actor=users["operator"])
    assert refused.value.code == "forbidden"
    with pytest.raises(Refused) as refused:
        services.kill_orphan(gpu=fake_gpus.gpus[1], pid=1234, actor=users["admin"])
    assert refused.value.code == "not_found"  # not on that GPU
    with pytest.raises(Refused):
        services.kill_orphan(gpu=gpu, pid="x", actor=users["admin"])
    services.kill_orphan(gpu=gpu, pid=1234, actor=users["admin"])
    assert sent == [
        ("kill_orphan", ["testhost", 1234, users["admin"].pk, gpu.pk], {"queue": "host.testhost"})
    ]


def test_dispatchers_fan_out_to_live_hosts_only(fake_gpus, sent, settings):
    from datetime import timedelta

    from django.utils import timezone

    from gpus.models import Host
    from models_app import tasks

    Host.objects.create(name="gone", last_seen=timezone.now() - timedelta(hours=1))
    Host.objects.create(name="never-seen")
    assert tasks.dispatch_refresh() == 1
    assert tasks.dispatch_reconcile() == 1
    assert sent == [
        (
            "refresh_host",
            ["testhost"],
            {"queue": "host.testhost", "expires": settings.GPU_REFRESH_SECONDS * 0.8},
        ),
        (
            "reconcile_host",
            ["testhost"],
            {"queue": "host.testhost", "expires": settings.RECONCILE_SECONDS * 0.8},
        ),
    ]
