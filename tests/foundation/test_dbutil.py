"""utilities.dbutil's plain statements write what the ORM would (each value prepared by its field: datetimes,
JSON, NULLs), change only the rows they match, and refuse what they cannot write; GpuInstance.objects.by_id
reads what select_related would."""

from datetime import timedelta

import pytest
from django.db.models import F
from django.utils import timezone

from gateway.models import UsageRecord
from models_app.models import GpuInstance, InstanceEvent, InstanceGpu
from models_app.state import transition
from tests.helpers import running_instance
from utilities.dbutil import insert, update

pytestmark = pytest.mark.django_db


@pytest.fixture
def instance(fake_gpus, tiny_model):
    return running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus)


def test_update_sets_typed_values_on_the_matching_row_only(instance, fake_gpus, tiny_model):
    other = running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[:1])
    when = timezone.now() - timedelta(minutes=3)
    changed = update(
        GpuInstance,
        {"status": "stopping", "argv": ["llama-server", "-m", "x.gguf"], "loaded_at": when, "exit_code": None,
         "memory_estimate": {"total_mib": 12}, "process_create_time": 1.5},
        {"pk": instance.pk, "status__in": ["running", "starting"]},
    )  # fmt: skip
    assert changed == 1
    instance.refresh_from_db()
    assert (instance.status, instance.argv, instance.loaded_at, instance.exit_code) == (
        "stopping", ["llama-server", "-m", "x.gguf"], when, None,
    )  # fmt: skip
    assert (instance.memory_estimate, instance.process_create_time) == ({"total_mib": 12}, 1.5)
    other.refresh_from_db()
    assert other.status == "running" and other.argv == []


def test_update_matches_nothing_when_the_status_moved(instance):
    assert update(GpuInstance, {"status": "stopped"}, {"pk": instance.pk, "status__in": ["stopping"]}) == 0
    instance.refresh_from_db()
    assert instance.status == "running"


def test_update_by_a_foreign_key_and_a_boolean(instance):
    assert update(InstanceGpu, {"active": False}, {"instance_id": instance.pk, "active": True}) == 2
    assert not InstanceGpu.objects.filter(instance=instance, active=True).exists()


def test_update_refuses_expressions_and_empty_lists(instance):
    with pytest.raises(TypeError, match="plain value"):
        update(GpuInstance, {"restart_count": F("restart_count") + 1}, {"pk": instance.pk})
    with pytest.raises(ValueError, match="empty list"):
        update(GpuInstance, {"status": "stopped"}, {"pk": instance.pk, "status__in": []})


def test_insert_writes_every_field_and_refuses_unknown_or_missing_ones(instance, users):
    now = timezone.now()
    values = {
        "instance_id": instance.pk, "kind": "unloaded", "actor_id": users["admin"].pk, "actor_name": "admin",
        "detail": "exit code 0", "reason": "", "created_at": now,
    }  # fmt: skip
    insert(InstanceEvent, values)
    event = InstanceEvent.objects.get(instance=instance, kind="unloaded")
    assert (event.actor, event.detail, event.created_at) == (users["admin"], "exit code 0", now)
    with pytest.raises(TypeError, match="no field colour"):
        insert(InstanceEvent, {**values, "colour": "red"})
    with pytest.raises(TypeError, match="no value for reason"):
        insert(InstanceEvent, {k: v for k, v in values.items() if k != "reason"})
    assert UsageRecord.objects.count() == 0  # nothing else written


def test_a_transition_through_plain_sql_releases_the_gpus_and_writes_its_event(instance, users):
    assert transition(instance, "stopping", event_kind="unload_requested", actor=users["admin"])
    assert instance.gpu_links.filter(active=True).count() == 2  # still held while it stops
    assert transition(
        instance, "stopped", event_kind="unloaded", actor=users["admin"], detail="exit code 0",
        stopped_at=timezone.now(), exit_code=0, lease_expires_at=None,
    )  # fmt: skip
    instance.refresh_from_db()
    assert (instance.status, instance.exit_code, instance.memory_source) == ("stopped", 0, "none")
    assert not instance.gpu_links.filter(active=True).exists()
    event = instance.events.get(kind="unloaded")
    assert (event.actor_name, event.detail) == ("admin", "exit code 0")
    assert not transition(instance, "stopped", expected=["stopping"], event_kind="unloaded")  # moved already
    assert instance.events.count() == 2


def test_by_id_reads_what_select_related_reads(instance):
    GpuInstance.objects.filter(pk=instance.pk).update(argv=["a", "b"], loaded_at=timezone.now())
    read = GpuInstance.objects.by_id(instance.pk, "model", "host")
    expected = GpuInstance.objects.select_related("model", "host").get(pk=instance.pk)
    for field in GpuInstance._meta.concrete_fields:
        assert getattr(read, field.attname) == getattr(expected, field.attname), field.name
    assert read.host == expected.host and read.host.name == expected.host.name
    assert read.model.cli_params == expected.model.cli_params
    assert GpuInstance.objects.by_id(instance.pk + 1000) is None


def test_refresh_reads_the_row_again_in_place(instance):
    stale = GpuInstance.objects.get(pk=instance.pk)
    GpuInstance.objects.filter(pk=instance.pk).update(status="stopping", error="asked", port=8123)
    GpuInstance.objects.refresh(stale, "host")
    assert (stale.status, stale.error, stale.port, stale.host.name) == (
        "stopping",
        "asked",
        8123,
        instance.host.name,
    )
    GpuInstance.objects.filter(pk=instance.pk).delete()
    with pytest.raises(GpuInstance.DoesNotExist):
        GpuInstance.objects.refresh(stale, "host")
