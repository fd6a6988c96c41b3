"""utilities.dbutil's plain statements write what the ORM would (each value prepared by its field: datetimes,
JSON, NULLs), read what it would (each column converted by its field), change only the rows they match, and
refuse what they cannot write; GpuInstance.objects.by_id reads what select_related would."""

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.db import DEFAULT_DB_ALIAS, IntegrityError, connection, connections, transaction
from django.db.models import F
from django.db.transaction import TransactionManagementError
from django.test.utils import CaptureQueriesContext
from django.utils import timezone
from django.utils.safestring import SafeString

from gateway.models import UsageRecord
from gpus.models import Gpu
from models_app.models import GpuInstance, InstanceEvent, InstanceGpu, ModelConfig
from models_app.state import transition
from tests.helpers import running_instance
from utilities.dbutil import _preparer, create, execute, insert, now_value, read, select, update

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
    no_owner = GpuInstance.objects.by_id(instance.pk, "owner", "host")  # a NULL key: None attached, no read
    assert no_owner.owner_id is None and no_owner.owner is None and no_owner.host.name == expected.host.name


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


def _same_rows(found, expected, fields):
    assert [row.pk for row in found] == [row.pk for row in expected]
    for row, other in zip(found, expected, strict=True):
        for name in fields:
            assert getattr(row, name) == getattr(other, name), name


def test_select_reads_what_the_orm_reads_field_by_field(instance, fake_gpus):
    GpuInstance.objects.filter(pk=instance.pk).update(
        argv=["a", "b"], loaded_at=timezone.now(), memory_estimate={"total_mib": 3}, process_create_time=2.5
    )
    found = select(GpuInstance, {"pk": instance.pk})
    expected = list(GpuInstance.objects.filter(pk=instance.pk))
    _same_rows(found, expected, [f.attname for f in GpuInstance._meta.concrete_fields])
    assert found[0]._state.adding is False and found[0].host == fake_gpus.host  # a saved row, related lazily
    gpus = select(Gpu, {"host_id": fake_gpus.host.pk, "index__in": [1, 0]}, order_by=("-index",))
    _same_rows(gpus, list(Gpu.objects.filter(host=fake_gpus.host).order_by("-index")), ["uuid", "processes"])


def test_select_conditions_columns_order_and_limit(instance, fake_gpus, tiny_model):
    from tests.helpers import running_instance

    other = running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[:1])
    GpuInstance.objects.filter(pk=other.pk).update(memory_measured_mb=100, memory_estimated_mb=90)
    assert [i.pk for i in select(GpuInstance, {"memory_measured_mb__isnull": False})] == [other.pk]
    assert [i.pk for i in select(GpuInstance, {"memory_measured_mb__isnull": True})] == [instance.pk]
    assert [i.pk for i in select(GpuInstance, {"pk__ne": instance.pk})] == [other.pk]
    assert [i.pk for i in select(GpuInstance, {"pk__gt": instance.pk})] == [other.pk]
    assert [i.pk for i in select(GpuInstance, {"pk__lte": instance.pk})] == [instance.pk]
    newest = select(GpuInstance, {}, order_by=("-pk",), limit=1)
    assert [i.pk for i in newest] == [other.pk]
    only = select(GpuInstance, {"pk": other.pk}, columns=("status", "memory_measured_mb"))[0]
    assert (only.status, only.memory_measured_mb) == ("running", 100)
    assert only.get_deferred_fields() >= {"argv", "port", "model_id"}  # read on access, as .only() does
    assert only.port == other.port
    assert "argv" in select(GpuInstance, {"pk": other.pk}, exclude=("argv",))[0].get_deferred_fields()
    with pytest.raises(ValueError, match="empty list"):
        select(GpuInstance, {"pk__in": []})
    with pytest.raises(ValueError, match="unknown lookup"):
        select(GpuInstance, {"port__contains": 1})
    with pytest.raises(TypeError, match="plain value"):
        select(GpuInstance, {"port": F("pid")})


def test_select_for_update_reads_the_rows_in_order(fake_gpus):
    from django.db import connection

    pks = [g.pk for g in fake_gpus.gpus]
    with CaptureQueriesContext(connection) as captured, transaction.atomic():
        assert [g.pk for g in select(Gpu, {"pk__in": pks}, order_by=("pk",), for_update=True)] == sorted(pks)
    locking = [q["sql"] for q in captured.captured_queries if "FOR UPDATE" in q["sql"]]
    assert len(locking) == (1 if connection.features.has_select_for_update else 0)


def test_create_inserts_as_save_does_and_refuses_a_conflict(instance, fake_gpus, tiny_model):
    made = create(GpuInstance(model=tiny_model, host=fake_gpus.host, gpu_ids="1", argv=["x"]))
    saved = GpuInstance(model=tiny_model, host=fake_gpus.host, gpu_ids="1", argv=["x"])
    saved.save()
    assert made.pk and made._state.adding is False
    read, expected = GpuInstance.objects.get(pk=made.pk), GpuInstance.objects.get(pk=saved.pk)
    for field in GpuInstance._meta.concrete_fields:
        if field.name not in ("id", "requested_at"):
            assert getattr(read, field.attname) == getattr(expected, field.attname), field.name
    assert read.requested_at == made.requested_at  # the field's default, as written
    create(InstanceGpu(instance=made, gpu=fake_gpus.gpus[1], position=0))
    with pytest.raises(IntegrityError), transaction.atomic():  # GPU 1 held twice by one instance
        create(InstanceGpu(instance=made, gpu=fake_gpus.gpus[1], position=1))
    assert InstanceGpu.objects.filter(instance=made).count() == 1


def test_read_joins_and_converts_each_column_by_its_field(instance, fake_gpus, tiny_model):
    GpuInstance.objects.filter(pk=instance.pk).update(memory_estimate={"per_gpu": [{"estimated_mib": 7}]})
    ModelConfig.objects.filter(pk=tiny_model.pk).update(exclusive=True)
    rows = read(
        "SELECT {l.gpu}, {l.position}, {i.memory_estimate}, {i.requested_at}, {m.exclusive} FROM {l} "
        "INNER JOIN {i} ON {i.pk} = {l.instance} INNER JOIN {m} ON {m.id} = {i.model} "
        "WHERE {l.gpu} IN ({many}) AND {l.active} = %s ORDER BY {l.position}",
        {"l": InstanceGpu, "i": GpuInstance, "m": ModelConfig},
        [*(g.pk for g in fake_gpus.gpus), True],
        many=len(fake_gpus.gpus),
    )
    instance.refresh_from_db()
    assert rows == [
        (link.gpu_id, link.position, {"per_gpu": [{"estimated_mib": 7}]}, instance.requested_at, True)
        for link in instance.gpu_links.order_by("position")
    ]
    assert all(type(row[4]) is bool for row in rows)  # SQLite's 1, converted as the ORM converts it


def test_execute_writes_on_the_driver_and_keeps_what_djangos_cursor_does(instance):
    """`execute` (the writes' way, past Django's cursor): rows changed, RETURNING, errors as Django's, nothing
    run in an atomic block marked for rollback, and a test counting statements still sees them."""
    table = GpuInstance._meta.db_table
    sql = f'UPDATE "{table}" SET "in_flight" = "in_flight" + %s WHERE "id" = %s'
    assert execute(sql, [2, instance.pk]) == 1 and execute(sql, [1, -1]) == 0
    assert GpuInstance.objects.get(pk=instance.pk).in_flight == 2
    model = ModelConfig.objects.get()
    clash = f'INSERT INTO "{ModelConfig._meta.db_table}" ("id", "name") VALUES (%s, %s) RETURNING "id"'
    with pytest.raises(IntegrityError), transaction.atomic():  # Django's IntegrityError, not the driver's
        execute(clash, [model.pk, "again"], returning=True)
    with transaction.atomic():
        transaction.set_rollback(True)  # as an error caught inside the block leaves it
        with pytest.raises(TransactionManagementError):  # a broken block: nothing more runs in it
            execute(sql, [1, instance.pk])
    with CaptureQueriesContext(connection) as captured:
        execute(sql, [1, instance.pk])
    assert len(captured) == 1 and "in_flight" in captured[0]["sql"]


def test_now_value_is_what_the_field_would_write():
    before = timezone.now()
    value = now_value()
    after = timezone.now()
    adapted = connection.ops.adapt_datetimefield_value(before)
    assert type(value) is type(adapted)
    if isinstance(value, str):  # SQLite: naive UTC text, read back as the field reads it
        assert value[:10] == adapted[:10] and value[10] == " "
        parsed = timezone.make_aware(datetime.fromisoformat(value), UTC)
        assert before <= parsed <= after
    else:
        assert before <= value <= after


_SAMPLES = [
    None,
    0,
    7,
    -3,
    2**40,
    True,
    False,
    "",
    "text",
    "12",
    "t",
    1.5,
    3.0,
    Decimal("2.50"),
    datetime(2026, 12, 7, 13, 5, 9, 123456, tzinfo=UTC),
    datetime(2026, 12, 7, 14, 5, 9, tzinfo=timezone.get_fixed_timezone(60)),
    SafeString("safe"),
    ["a", 1],
    {"k": 1},
]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # a naive datetime given to a DateTimeField
@pytest.mark.parametrize("model", [UsageRecord, GpuInstance, InstanceEvent, Gpu])
def test_the_shortcuts_prepare_every_value_as_its_field_does(model):
    """The preparers `insert` and `update` use give what `field.get_db_prep_save` gives, value by value, for
    every field of the hot paths' models and values of every kind (or fail as the field fails)."""
    db = connections[DEFAULT_DB_ALIAS]
    checked = 0
    for field in model._meta.concrete_fields:
        prepare = _preparer(field, db)
        for value in [*_SAMPLES, datetime(2026, 12, 7, 13, 5, 9)]:
            try:
                expected = field.get_db_prep_save(value, connection)
            except Exception as exc:  # the field refuses it: so must the shortcut, the same way
                with pytest.raises(type(exc)):
                    prepare(value)
                continue
            got = prepare(value)
            assert type(got) is type(expected), (field.name, value)
            assert got == expected or repr(got) == repr(expected), (
                field.name,
                value,
            )  # psycopg's Jsonb: no ==
            checked += 1
    assert checked > 50
