"""A host that went quiet does not hold GPUs forever; an admin can clear its marks."""

from datetime import timedelta
from io import StringIO

import pytest
from django.conf import settings as django_settings
from django.core.management import call_command
from django.utils import timezone

from gpus.models import Gpu, Host
from models_app import reconcile, tasks
from models_app.errors import Refused
from models_app.models import GpuInstance, InstanceEvent
from models_app.services import request_load, request_unload

Status = GpuInstance.Status
Kind = InstanceEvent.Kind


def _silence(host, seconds):
    Host.objects.filter(pk=host.pk).update(last_seen=timezone.now() - timedelta(seconds=seconds))
    host.refresh_from_db()


def _age(instance, seconds):
    instance.events.update(created_at=timezone.now() - timedelta(seconds=seconds))


def test_silent_host_fails_its_waiting_work_and_marks_its_gpus(fake_gpus, tiny_model, users, sent, settings):
    settings.HOST_TIMEOUT_SECONDS = 60
    pending = request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    stopping = request_load(model_id="tiny", gpu_spec="1", actor=None)
    request_unload(instance=stopping, actor=None)
    assert tasks.check_hosts() == {}  # heard of just now
    _silence(fake_gpus.host, 120)
    _age(pending, 120)
    _age(stopping, 120)
    since = timezone.localtime(fake_gpus.host.last_seen)
    reason = f"host testhost not heard from since {since:%H:%M}"

    assert tasks.check_hosts() == {"failed": 2, "hosts": 1}
    for instance in (pending, stopping):
        instance.refresh_from_db()
        assert (instance.status, instance.error) == (Status.FAILED, reason)
        assert instance.events.filter(kind=Kind.HOST_LOST, detail=reason).exists()
        assert not instance.gpu_links.filter(active=True).exists()
    assert set(Gpu.objects.values_list("state", "state_reason")) == {(Gpu.State.UNAVAILABLE, reason)}
    host_event = InstanceEvent.objects.get(kind=Kind.HOST_GPUS_MARKED, instance=None)
    assert host_event.detail == f"{reason}: 2 GPU(s) marked unavailable"

    # Nobody can load onto the host, or unload from it, while it is down: 409 naming the host.
    with pytest.raises(Refused) as refused:
        request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    assert refused.value.code == "busy"
    assert refused.value.message == (
        f"cannot load: host testhost is down ({reason}); its worker must answer again first"
    )
    assert tasks.check_hosts() == {}  # once per silence

    # An admin clears the GPUs' marks; the clearing sticks while the host stays silent.
    out = StringIO()
    call_command("clear_host", "testhost", "--user", "admin", stdout=out)
    assert out.getvalue().strip() == "testhost: 2 GPU(s) cleared"
    assert set(Gpu.objects.values_list("state", "state_reason")) == {(Gpu.State.IDLE, "")}
    assert InstanceEvent.objects.filter(kind=Kind.HOST_LOST, actor_name="admin").exists()
    assert tasks.check_hosts() == {}

    # Back: a load asked for just now, then silence again gives it its own full timeout.
    Host.objects.filter(pk=fake_gpus.host.pk).update(last_seen=timezone.now())
    fresh = request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    _silence(fake_gpus.host, 120)
    assert "failed" not in tasks.check_hosts()  # asked for after the silence began: it waits
    _age(fresh, 120)
    assert tasks.check_hosts() == {"failed": 1}


def test_running_instances_of_a_down_host_become_unknown_and_keep_their_figures(
    fake_gpus, tiny_model, users, sent, settings
):
    settings.HOST_TIMEOUT_SECONDS = 60
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    GpuInstance.objects.filter(pk=instance.pk).update(
        status=Status.RUNNING, pid=4242, memory_used_mb=321, loaded_at=timezone.now()
    )
    _silence(fake_gpus.host, 120)
    assert tasks.check_hosts() == {"unknown": 1, "hosts": 1}
    instance.refresh_from_db()
    assert (instance.status, instance.memory_used_mb, instance.pid) == (Status.UNKNOWN, 321, 4242)
    assert instance.gpu_links.filter(active=True).exists()  # it still holds its GPU
    assert instance.events.filter(kind=Kind.HOST_LOST, detail__contains="may still run").exists()
    with pytest.raises(Refused, match="cannot unload instance #.*host testhost is down"):
        request_unload(instance=instance, actor=users["admin"])
    assert tasks.check_hosts() == {}


def test_a_down_host_that_will_not_return_is_retired(fake_gpus, tiny_model, users, sent, settings):
    from django.core.management.base import CommandError

    settings.HOST_TIMEOUT_SECONDS = 60
    with pytest.raises(CommandError, match="not retired: host testhost is up"):
        call_command("clear_host", "testhost", "--retire")
    instance = request_load(model_id="tiny", gpu_spec="0", actor=None)
    GpuInstance.objects.filter(pk=instance.pk).update(status=Status.RUNNING, loaded_at=timezone.now())
    _silence(fake_gpus.host, 120)
    tasks.check_hosts()
    out = StringIO()
    call_command("clear_host", "testhost", "--retire", "--user", "admin", stdout=out)
    assert out.getvalue().splitlines() == [
        "testhost: 1 unknown instance(s) written off",
        "testhost: 2 GPU(s) cleared",
    ]
    instance.refresh_from_db()
    assert instance.status == Status.FAILED and instance.error.startswith("host testhost retired by admin")
    assert not instance.gpu_links.filter(active=True).exists()


def test_a_host_that_answers_again_is_not_lost(fake_gpus, tiny_model, sent, settings):
    settings.HOST_TIMEOUT_SECONDS = 60
    _silence(fake_gpus.host, 120)
    reconcile.reconcile_host("testhost")  # a reconcile pass is a heartbeat
    assert tasks.check_hosts() == {}
    assert not Gpu.objects.filter(state=Gpu.State.UNAVAILABLE).exists()


def test_clear_host_refuses_unknown_host(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="unknown host 'nowhere'"):
        call_command("clear_host", "nowhere")


def test_host_check_is_on_the_beat_schedule_for_the_default_queue():
    entry = django_settings.CELERY_BEAT_SCHEDULE["check-hosts"]
    assert entry["task"] == "models_app.tasks.check_hosts"
    assert "queue" not in entry["options"]  # the default queue: the lost host's own has nobody
    assert entry["options"]["expires"] < entry["schedule"] <= django_settings.HOST_TIMEOUT_SECONDS


def test_host_timeout_setting_fails_loudly(monkeypatch):
    import importlib

    from django.core.exceptions import ImproperlyConfigured

    import llamacontroller_site.settings as site_settings

    monkeypatch.setenv("LLAMACONTROLLER_HOST_TIMEOUT_SECONDS", "5")
    monkeypatch.setenv("LLAMACONTROLLER_HOST_HEARTBEAT_SECONDS", "2")
    try:
        with pytest.raises(ImproperlyConfigured, match="must be at least three heartbeats"):
            importlib.reload(site_settings)
    finally:
        monkeypatch.undo()
        importlib.reload(site_settings)
