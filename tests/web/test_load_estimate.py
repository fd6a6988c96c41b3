"""The load form's prediction: as soon as a model and GPUs are picked it says whether the model fits and how
much is free; with none picked it suggests the placement's choice (which the page preselects)."""

from django.utils import timezone

from gpus.models import Gpu, Host
from models_app.models import LlamaBinary

HTMX = {"HTTP_HX_REQUEST": "true"}
TRAIN = [{"pid": 4242, "name": "train.py", "used_mib": 24400, "owner": "foreign"}]


def test_the_form_asks_for_the_estimate(client, users, fake_gpus, tiny_model):
    client.force_login(users["operator"])
    page = client.get("/").content.decode()
    assert 'id="load-estimate" hx-get="/load/estimate/"' in page


def test_fits_and_does_not_fit(client, users, fake_gpus, tiny_model):
    client.force_login(users["operator"])
    Gpu.objects.filter(host=fake_gpus.host).update(memory_used_mib=10)
    Gpu.objects.filter(pk=fake_gpus.gpus[1].pk).update(
        memory_used_mib=24410, processes=TRAIN, state=Gpu.State.OCCUPIED_BY_OTHERS
    )
    fits = client.get("/load/estimate/?model_id=tiny&gpu=testhost:0", **HTMX).content.decode()
    assert "≈ 302 MiB on GPU 0: fits, 24.0 GiB free" in fits and "estimate-fits" in fits
    assert "GPU 0: weights 0 MiB, KV 0 MiB, compute 1 MiB, CUDA context 300 MiB" in fits
    too_big = client.get("/load/estimate/?model_id=tiny&gpu=testhost:1", **HTMX).content.decode()
    assert "does not fit: GPU 1 needs 302 MiB, 154 MiB free after train.py" in too_big
    assert "estimate-too-big" in too_big


def test_without_gpus_the_suggestion_is_preselected(client, users, fake_gpus, tiny_model):
    client.force_login(users["operator"])
    Host.objects.filter(pk=fake_gpus.host.pk).update(last_seen=timezone.now())
    LlamaBinary.objects.create(host=fake_gpus.host, name="d", path="/x/llama-server", is_default=True)
    Gpu.objects.filter(host=fake_gpus.host).update(memory_used_mib=10)
    Gpu.objects.filter(pk=fake_gpus.gpus[0].pk).update(memory_used_mib=24200)  # too little for tiny's claim
    body = client.get("/load/estimate/?model_id=tiny", **HTMX).content.decode()
    assert 'data-suggest="testhost:1"' in body and "Suggested: <strong>GPU 1</strong>" in body
    assert "fits with 23.2 GiB to spare" in body  # after its claim: the estimate and 512 MiB of headroom


def test_bad_choices_say_so(client, users, fake_gpus, tiny_model):
    client.force_login(users["operator"])
    assert "Choose a model." in client.get("/load/estimate/?model_id=nope", **HTMX).content.decode()
    body = client.get("/load/estimate/?model_id=tiny&gpu=testhost:9", **HTMX).content.decode()
    assert "host testhost has no GPU 9" in body


def test_the_instance_card_shows_its_estimate_and_error(client, users, fake_gpus, tiny_model):
    from models_app import services
    from models_app.models import GpuInstance

    client.force_login(users["viewer"])
    Gpu.objects.filter(host=fake_gpus.host).update(memory_used_mib=10)
    instance = services.request_load(model_id="tiny", gpu_spec="0", actor=users["operator"])
    GpuInstance.objects.filter(pk=instance.pk).update(memory_measured_mb=22, memory_estimate_error_pct=-92.7)
    page = client.get("/", HTTP_HX_REQUEST="true").content.decode()
    assert f"Estimated {instance.memory_estimated_mb} MiB · measured 22 MiB (-92.7 %)" in page
