"""The database itself enforces the registry's and the GPUs' invariants."""

import pytest
from django.db import IntegrityError, transaction

from gpus.models import Gpu, Host
from models_app.models import GpuInstance, InstanceGpu, ModelConfig


@pytest.fixture
def setup(db):
    host = Host.objects.create(name="h1")
    gpu0 = Gpu.objects.create(host=host, index=0, uuid="GPU-a", name="A", memory_total_mib=100)
    gpu1 = Gpu.objects.create(host=host, index=1, uuid="GPU-b", name="B", memory_total_mib=100)
    model = ModelConfig.objects.create(id="m", name="M", path="/x.gguf")
    return host, gpu0, gpu1, model


def make_instance(host, model, gpus, status=GpuInstance.Status.PENDING, port=None):
    instance = GpuInstance.objects.create(
        model=model, host=host, gpu_ids=",".join(str(g.index) for g in gpus), status=status, port=port
    )
    active = status in GpuInstance.ACTIVE_STATUSES
    for position, gpu in enumerate(gpus):
        InstanceGpu.objects.create(instance=instance, gpu=gpu, position=position, active=active)
    return instance


def test_gpu_uuid_is_unique(setup):
    host = setup[0]
    with pytest.raises(IntegrityError), transaction.atomic():
        Gpu.objects.create(host=host, index=5, uuid="GPU-a", name="dup", memory_total_mib=1)


def test_model_id_is_unique(setup):
    with pytest.raises(IntegrityError), transaction.atomic():
        ModelConfig.objects.bulk_create([ModelConfig(id="m", name="again", path="/y.gguf")])


def test_several_active_instances_may_hold_one_gpu(setup):
    """GPUs are shared by memory: admission (models_app/admission.py) guarantees that the claims fit, not
    the database (tests/models_app/test_admission.py proves it under concurrency on PostgreSQL)."""
    host, gpu0, gpu1, model = setup
    make_instance(host, model, [gpu0, gpu1])
    make_instance(host, model, [gpu1])
    assert InstanceGpu.objects.filter(gpu=gpu1, active=True).count() == 2


def test_a_released_gpu_can_be_claimed_again(setup):
    host, gpu0, _, model = setup
    make_instance(host, model, [gpu0], status=GpuInstance.Status.STOPPED)
    make_instance(host, model, [gpu0], status=GpuInstance.Status.STOPPED)
    make_instance(host, model, [gpu0])
    assert InstanceGpu.objects.filter(gpu=gpu0, active=True).count() == 1


def test_two_active_instances_never_share_a_port(setup):
    host, gpu0, gpu1, model = setup
    make_instance(host, model, [gpu0], status=GpuInstance.Status.RUNNING, port=8081)
    with pytest.raises(IntegrityError), transaction.atomic():
        make_instance(host, model, [gpu1], status=GpuInstance.Status.STARTING, port=8081)
    make_instance(host, model, [gpu1], status=GpuInstance.Status.STOPPED, port=8081)


def test_transition_releases_gpus_and_writes_an_event(setup):
    from models_app.state import transition

    host, gpu0, _, model = setup
    instance = make_instance(host, model, [gpu0], status=GpuInstance.Status.STOPPING)
    assert transition(instance, "stopped", expected=["stopping"], event_kind="unloaded", detail="bye")
    assert not InstanceGpu.objects.filter(active=True).exists()
    assert instance.events.get().kind == "unloaded"
    # A second, stale transition loses the compare-and-set and changes nothing.
    assert not transition(instance, "crashed", expected=["running"], event_kind="crashed")
    assert GpuInstance.objects.get().status == "stopped"


def test_deleting_an_instance_keeps_its_events(setup):
    """The audit trail is append-only even for deletes that bypass the admin (shell, future code paths)."""
    from models_app.models import InstanceEvent

    host, gpu0, _, model = setup
    instance = make_instance(host, model, [gpu0], status=GpuInstance.Status.STOPPED)
    event = InstanceEvent.objects.create(instance=instance, kind="requested", actor_name="system")
    instance.delete()
    event.refresh_from_db()
    assert event.instance_id is None
