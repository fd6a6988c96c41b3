"""Code reads back event kinds and GPU causes, never the wording of a message (issue 18, item 4): rewording
a message changes no resend limit, no GPU mark, no dashboard list; the migrations convert the old rows."""

import importlib
from datetime import timedelta

from django.apps import apps
from django.contrib.auth import get_user_model
from django.utils import timezone

from gpus import services as gpu_services
from gpus.models import Gpu, Host
from models_app import hosts, reconcile
from models_app.models import GpuInstance, InstanceEvent
from models_app.services import request_load
from tests.helpers import age_events, keep_host_up

Status = GpuInstance.Status
Kind = InstanceEvent.Kind


def test_rewording_a_resend_changes_neither_its_count_nor_its_limit(
    fake_gpus, tiny_model, sent, beat, monkeypatch
):
    monkeypatch.setattr(reconcile, "RESENT", "tried once more")
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    for n in range(1, reconcile.MAX_RESENDS + 1):
        age_events(instance, reconcile.GRACE_SECONDS * 2 ** (n - 1) + 1)
        keep_host_up(fake_gpus.host)
        assert beat() == {"resent": 1}
    resends = instance.events.filter(kind=Kind.RESENT).order_by("id")
    assert resends.count() == reconcile.MAX_RESENDS
    assert resends.last().detail == "tried once more to host.testhost: no worker took the load (3 of 3)"
    assert reconcile._resends(instance) == reconcile.MAX_RESENDS
    age_events(instance, reconcile.GRACE_SECONDS * 2**reconcile.MAX_RESENDS + 1)
    keep_host_up(fake_gpus.host)
    assert beat() == {"failed": 1}
    instance.refresh_from_db()
    assert instance.status == Status.FAILED
    assert [name for name, *_ in sent] == ["load_model"] * reconcile.MAX_RESENDS


def test_old_wording_alone_counts_no_resend(fake_gpus, tiny_model, sent):
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    InstanceEvent.objects.create(
        instance=instance, kind=Kind.REQUESTED, actor_name="system", detail="sent again"
    )
    assert reconcile._resends(instance) == 0


def test_clear_host_finds_the_marks_by_cause_not_reason(fake_gpus, monkeypatch):
    host = fake_gpus.host
    first, second = Gpu.objects.filter(host=host).order_by("index")[:2]
    monkeypatch.setattr(Host, "down_prefix", lambda self: f"worker of {self.name} silent")
    assert gpu_services.mark_host_lost(host, host.down_reason()) == Gpu.objects.filter(host=host).count()
    first.refresh_from_db()
    assert (first.state, first.unavailable_cause) == (Gpu.State.UNAVAILABLE, Gpu.Cause.HOST_DOWN)
    assert first.state_reason.startswith("worker of testhost silent")
    # Unavailable for another cause, though worded like a mark: left alone.
    Gpu.objects.filter(pk=second.pk).update(
        state_reason="host testhost not heard from since 10:00", unavailable_cause=Gpu.Cause.NONE
    )
    cleared = hosts.clear_host(host)
    assert cleared == Gpu.objects.filter(host=host).count() - 1
    first.refresh_from_db()
    second.refresh_from_db()
    assert (first.state, first.state_reason, first.unavailable_cause) == (Gpu.State.IDLE, "", "")
    assert second.state == Gpu.State.UNAVAILABLE


def test_a_refresh_takes_the_mark_away(fake_gpus):
    host = fake_gpus.host
    gpu_services.mark_host_lost(host, host.down_reason())
    gpu_services.refresh_host(host.name, [])
    assert not Gpu.objects.filter(unavailable_cause=Gpu.Cause.HOST_DOWN).exists()
    assert hosts.clear_host(host) == 0


def test_the_gpus_of_a_silent_host_are_marked_once_whatever_the_wording(fake_gpus, monkeypatch):
    host = fake_gpus.host
    monkeypatch.setattr(Host, "down_prefix", lambda self: f"worker of {self.name} silent")
    Host.objects.filter(pk=host.pk).update(last_seen=timezone.now() - timedelta(hours=1))
    assert hosts.check_hosts() == {"hosts": 1}
    assert hosts.check_hosts() == {}
    event = InstanceEvent.objects.get(kind=Kind.HOST_GPUS_MARKED)
    assert event.detail.startswith("worker of testhost silent")
    host.refresh_from_db()
    assert host.gpus_marked_at is not None and host.gpus_marked_at <= event.created_at


def _migration(app, name):
    return importlib.import_module(f"{app}.migrations.{name}")


def test_the_data_migrations_convert_the_old_rows_and_back(fake_gpus, tiny_model, sent):
    host = fake_gpus.host
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    mark = "host testhost not heard from since 10:00"
    old = {  # key: (kind, detail), as the old code wrote them
        "load": (Kind.REQUESTED, "sent again to host.testhost: no worker took the load (1 of 3)"),
        "unload": (Kind.UNLOAD_REQUESTED, "sent again to host.testhost: no worker took the unload (1 of 3)"),
        "over": (
            Kind.RESTARTING,
            "sent again: the worker was lost before llama-server started; loading again",
        ),
        "idle": (Kind.UNLOAD_REQUESTED, "idle for 31 min (keep-alive 30 min)"),
        "manual": (Kind.UNLOAD_REQUESTED, "idle for 31 min (by hand)"),
        "marks": (Kind.HOST_LOST, f"{mark}: 2 GPU(s) marked unavailable"),
        "lost": (Kind.HOST_LOST, mark),
        "cleared": (Kind.HOST_LOST, "host testhost: 2 GPU(s) cleared of the lost mark"),
    }
    rows = {}
    for key, (kind, detail) in old.items():
        on = instance if key in ("load", "unload", "over", "idle", "manual", "lost") else None
        rows[key] = InstanceEvent.objects.create(instance=on, kind=kind, actor_name="system", detail=detail)
    user = get_user_model().objects.create_user("someone")
    InstanceEvent.objects.filter(pk=rows["manual"].pk).update(actor=user)  # an unload by hand
    Gpu.objects.filter(host=host).update(
        state=Gpu.State.UNAVAILABLE,
        state_reason=mark,
        unavailable_cause="",
    )
    other = Gpu.objects.filter(host=host).order_by("index").last()
    Gpu.objects.filter(pk=other.pk).update(state_reason="GPU not reported by the driver any more")

    _migration("gpus", "0006_host_down_marks").mark_causes(apps, None)
    _migration("models_app", "0008_event_kinds").to_kinds(apps, None)

    def kinds():
        return {key: InstanceEvent.objects.get(pk=row.pk).kind for key, row in rows.items()}

    assert kinds() == {
        "load": "resent", "unload": "resent", "over": "resent", "idle": "idle_unload",
        "manual": "unload_requested", "marks": "host_gpus_marked", "lost": "host_lost", "cleared": "host_lost",
    }  # fmt: skip
    causes = dict(Gpu.objects.filter(host=host).values_list("pk", "unavailable_cause"))
    assert causes.pop(other.pk) == "" and set(causes.values()) == {"host_down"}
    host.refresh_from_db()
    assert host.gpus_marked_at == InstanceEvent.objects.get(pk=rows["marks"].pk).created_at

    _migration("models_app", "0008_event_kinds").from_kinds(apps, None)
    _migration("gpus", "0006_host_down_marks").unmark_causes(apps, None)
    assert kinds() == {key: kind for key, (kind, *_) in old.items()}
    assert set(Gpu.objects.filter(host=host).values_list("unavailable_cause", flat=True)) == {""}
