"""Model files per host: each worker reports which registered models it can serve (the file at the registered
path, inside its allowed folders, of the registered size); loads on a host without the file are refused up
front (409 with the reason), placement and the controller's own choice skip such hosts, and a registry change
asks every live host to check again."""

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from gpus.models import Host
from models_app import dispatch, model_files, placement, reconcile, services, tasks
from models_app.errors import Refused
from models_app.models import GpuInstance, HostModelFile, ModelConfig
from tests.helpers import refused, register_second_host
from utilities import dispatch as utilities_dispatch

HTMX = {"HTTP_HX_REQUEST": "true"}


@pytest.fixture
def box2(fake_gpus, settings, tmp_path):
    """A second live host, "box-2", with two fake GPUs; both hosts have a default llama-server."""
    return register_second_host("box-2", tmp_path / "box-2-gpus.json", settings)


def missing_on(host, model, reason="/models/x.gguf does not exist there"):
    return HostModelFile.objects.create(host=host, model=model, available=False, reason=reason)


# --- the report --------------------------------------------------------------------------------------


def test_report_available_missing_outside_and_wrong_size(fake_gpus, tiny_model, settings, tmp_path):
    folder = settings.MODEL_DIRS[0]
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF")
    ModelConfig.objects.create(id="missing", name="m", path=str(folder / "nope.gguf"))
    ModelConfig.objects.create(id="outside", name="o", path=str(outside))
    ModelConfig.objects.create(id="resized", name="r", path=tiny_model.path, file_size_bytes=12)

    assert model_files.check_on_this_host(fake_gpus.host) == {"created": 4, "changed": 0, "models": 4}

    rows = {r.model_id: r for r in HostModelFile.objects.filter(host=fake_gpus.host)}
    assert rows["tiny"].available and rows["tiny"].reason == ""
    assert rows["tiny"].size_bytes == tiny_model.file_size_bytes
    assert not rows["missing"].available
    assert rows["missing"].reason == f"{folder / 'nope.gguf'} does not exist there"
    assert (
        not rows["outside"].available and "outside the allowed model folders there" in rows["outside"].reason
    )
    assert not rows["resized"].available
    assert rows["resized"].reason == (
        f"{tiny_model.path} is {tiny_model.file_size_bytes} bytes there, the registry says 12"
    )


def test_report_writes_only_the_rows_that_changed(fake_gpus, tiny_model, settings):
    for n in range(5):
        ModelConfig.objects.create(id=f"m{n}", name=f"m{n}", path=tiny_model.path)
    host = fake_gpus.host
    with CaptureQueriesContext(connection) as first:
        model_files.check_on_this_host(host)
    assert len(first) == 3  # the models, the host's rows, one bulk insert
    before = dict(HostModelFile.objects.filter(host=host).values_list("model_id", "checked_at"))

    with CaptureQueriesContext(connection) as again:
        assert model_files.check_on_this_host(host) == {"created": 0, "changed": 0, "models": 6}
    assert len(again) == 2 and all(q["sql"].lstrip().upper().startswith("SELECT") for q in again)

    ModelConfig.objects.filter(pk__in=["m1", "m3"]).update(path=str(settings.MODEL_DIRS[0] / "gone.gguf"))
    ModelConfig.objects.create(id="new", name="new", path=tiny_model.path)
    with CaptureQueriesContext(connection) as changed:
        assert model_files.check_on_this_host(host) == {"created": 1, "changed": 2, "models": 7}
    assert len(changed) == 4  # the two reads, one bulk insert, one bulk update
    after = dict(HostModelFile.objects.filter(host=host).values_list("model_id", "checked_at"))
    assert {m for m in before if after[m] != before[m]} == {"m1", "m3"}
    assert not HostModelFile.objects.get(host=host, model_id="m1").available


def test_the_task_and_every_reconcile_pass_report(fake_gpus, tiny_model):
    assert tasks.check_model_files("testhost")["created"] == 1
    assert tasks.check_model_files("no-such-host") == {}
    HostModelFile.objects.all().delete()
    reconcile.reconcile_host("testhost")
    assert HostModelFile.objects.get(host=fake_gpus.host, model=tiny_model).available


def test_a_failing_report_never_breaks_the_reconcile_pass(fake_gpus, tiny_model, monkeypatch):
    def broken(host):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(model_files, "check_on_this_host", broken)
    assert reconcile.reconcile_host("testhost") == {}


# --- a registry change asks every live host to check again ---------------------------------------------


@pytest.fixture
def checks_sent(monkeypatch):
    calls = []
    publish = utilities_dispatch.publish

    def fake_publish(name, args, options):
        if name != dispatch.CHECK_MODEL_FILES:
            return publish(name, args, options)
        calls.append((args, options))

    monkeypatch.setattr(utilities_dispatch, "publish", fake_publish)
    return calls


# (Models made by fixtures would leave a check waiting for a commit that a test never makes: these tests
# make their models inside django_capture_on_commit_callbacks.)


def test_registry_change_sends_one_check_per_live_host_on_commit(
    box2, tiny_model_file, checks_sent, django_capture_on_commit_callbacks
):
    Host.objects.create(name="gone", last_seen=timezone.now() - timezone.timedelta(days=1))
    with django_capture_on_commit_callbacks(execute=True):
        with transaction.atomic():  # an import: several saves, one check per host
            model = ModelConfig.objects.create(id="one", name="One", path=str(tiny_model_file))
            ModelConfig.objects.create(id="two", name="Two", path=str(tiny_model_file))
            model.save()
        assert checks_sent == []  # nothing before the commit
    assert sorted((args[0], options["queue"]) for args, options in checks_sent) == [
        ("box-2", "host.box-2"),
        ("testhost", "host.testhost"),
    ]
    with django_capture_on_commit_callbacks(execute=True):
        model.save()  # the next change sends again
    assert len(checks_sent) == 4


def test_registry_change_through_the_api_sends_checks(
    client, users, fake_gpus, tiny_model_file, checks_sent, django_capture_on_commit_callbacks
):
    client.force_login(users["admin"])
    with django_capture_on_commit_callbacks(execute=True):
        response = client.post(
            "/api/v1/models/",
            {"id": "tiny", "name": "Tiny", "path": str(tiny_model_file)},
            content_type="application/json",
        )
    assert response.status_code == 201, response.content
    with django_capture_on_commit_callbacks(execute=True):
        response = client.patch("/api/v1/models/tiny/", {"name": "Renamed"}, content_type="application/json")
    assert response.status_code == 200, response.content
    assert [args for args, _ in checks_sent] == [["testhost"], ["testhost"]]


# --- loads refused up front --------------------------------------------------------------------------


def test_load_on_a_host_without_the_file_is_refused_with_the_reason(box2, tiny_model, users):
    missing_on(box2, tiny_model)
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="tiny", gpu_spec="0", host_name="box-2", actor=users["admin"])
    assert (refused.value.code, refused.value.field) == ("busy", "model_id")
    assert (
        refused.value.message == "model tiny cannot load on host box-2: /models/x.gguf does not exist there"
    )
    with pytest.raises(Refused, match="cannot load on host box-2"):
        services.request_switch(model_id="tiny", gpu_spec="1", host_name="box-2", actor=users["admin"])
    assert not GpuInstance.objects.exists()
    # The other host, which has not reported, is not ruled out: its worker checks again when it loads.
    instance = services.request_load(model_id="tiny", gpu_spec="0", host_name="testhost", actor=None)
    assert instance.host.name == "testhost"


def test_the_web_node_leaves_the_file_check_to_the_hosts_once_they_report(fake_gpus, tiny_model, settings):
    tiny_model.path = str(settings.MODEL_DIRS[0] / "only-on-the-gpu-hosts.gguf")
    tiny_model.save()
    with pytest.raises(Refused, match="file not found"):  # nobody reported: checked here, as before
        services.request_load(model_id="tiny", gpu_spec="0", actor=None)
    HostModelFile.objects.create(host=fake_gpus.host, model=tiny_model, available=True)
    assert services.request_load(model_id="tiny", gpu_spec="0", actor=None).status == "pending"
    # The path's form is still checked here.
    tiny_model.path = "/etc/passwd.gguf"
    tiny_model.save()
    with pytest.raises(Refused, match="outside the allowed model folders"):
        services.request_load(model_id="tiny", gpu_spec="1", actor=None)


# --- placement and the controller's choice -------------------------------------------------------------


def test_placement_skips_hosts_without_the_file(box2, tiny_model):
    choices, _ = placement.rank(tiny_model)
    assert {c.host.name for c in choices} == {"testhost", "box-2"}
    missing_on(box2, tiny_model)
    choices, out = placement.rank(tiny_model)
    assert {c.host.name for c in choices} == {"testhost"}
    assert out[0] == "host box-2: /models/x.gguf does not exist there"
    assert placement.choose_gpus(tiny_model)[0].name == "testhost"
    with refused("busy", match="that has the model file"):
        placement.choose_gpus(tiny_model, host=box2)


def test_nothing_fits_names_the_hosts_without_the_file(box2, tiny_model, fake_gpus):
    missing_on(box2, tiny_model)
    for gpu in fake_gpus.gpus:
        services.request_load(model_id="tiny", gpu_spec=str(gpu.index), host_name="testhost", actor=None)
    with refused("busy") as caught:
        placement.choose_gpus(tiny_model)
    assert "GPU 0 on testhost: tiny" in caught.value.message
    assert "host box-2: /models/x.gguf does not exist there (no model file)" in caught.value.message


def test_auto_load_picks_a_host_with_the_file(box2, tiny_model, fake_gpus, users, sent):
    missing_on(fake_gpus.host, tiny_model)
    instance = services.request_load_auto(model_id="tiny", actor=users["operator"])
    assert instance.host.name == "box-2" and instance.gpu_ids in ("0", "1")
    assert "chosen by the controller" in instance.events.get().detail
    with pytest.raises(Refused) as refused:
        services.request_load_auto(model_id="tiny", actor=users["operator"], host_name="testhost")
    assert refused.value.code == "busy" and "cannot load on host testhost" in refused.value.message
    with pytest.raises(Refused) as refused:
        services.request_load_auto(model_id="tiny", actor=users["viewer"])
    assert refused.value.code == "forbidden"


def test_auto_load_with_nothing_free_is_409_with_the_explanation(box2, tiny_model, fake_gpus, sent):
    missing_on(box2, tiny_model)
    for gpu in fake_gpus.gpus:
        services.request_load(model_id="tiny", gpu_spec=str(gpu.index), host_name="testhost", actor=None)
    with pytest.raises(Refused) as refused:
        services.request_load_auto(model_id="tiny", actor=None)
    assert (refused.value.code, refused.value.field) == ("busy", "gpu_id")
    assert refused.value.message.startswith("no free GPU to load tiny on: GPU 0 on testhost")


def test_cli_load_gpu_auto(box2, tiny_model, fake_gpus, sent, capsys):
    missing_on(fake_gpus.host, tiny_model)
    call_command("load", "tiny", "--gpu", "auto")
    assert "tiny on box-2 GPU" in capsys.readouterr().out
    missing_on(box2, tiny_model)
    with pytest.raises(CommandError, match="that has the model file"):
        call_command("load", "tiny", "--gpu", "auto")


def test_web_form_let_the_controller_choose(client, users, box2, tiny_model, fake_gpus, sent):
    missing_on(fake_gpus.host, tiny_model, reason="/m/tiny.gguf does not exist there")
    client.force_login(users["operator"])
    page = client.get("/load/estimate/", {"model_id": "tiny"}, **HTMX).content.decode()
    assert '<option value="box-2">box-2</option>' in page and '<option value="testhost"' not in page
    assert "Not on testhost (/m/tiny.gguf does not exist there)" in page
    page = client.get("/load/estimate/", {"model_id": "tiny", "gpu": "testhost:0"}, **HTMX).content.decode()
    assert "model tiny cannot load on host testhost" in page

    response = client.post("/load/", {"model_id": "tiny", "auto": "1", "gpu": ["testhost:0"]}, **HTMX)
    assert response.status_code == 200, response.content.decode()[:500]
    assert GpuInstance.objects.get().host.name == "box-2"
    response = client.post("/load/", {"model_id": "tiny", "auto": "1", "host": "testhost"}, **HTMX)
    assert response.status_code == 409 and "cannot load on host testhost" in response.content.decode()
    response = client.post("/load/", {"model_id": "tiny", "gpu": ["testhost:1"]}, **HTMX)
    assert response.status_code == 409 and "cannot load on host testhost" in response.content.decode()


def test_admin_shows_each_hosts_report_read_only(client, users, box2, tiny_model):
    missing_on(box2, tiny_model)
    client.force_login(users["admin"])
    page = client.get(f"/admin/models_app/modelconfig/{tiny_model.pk}/change/").content.decode()
    assert "Model file on each host (reported by its worker)" in page
    assert "/models/x.gguf does not exist there" in page
    assert 'name="host_files-0-reason"' not in page  # shown, never edited
