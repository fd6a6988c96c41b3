"""The dashboard's live cards and what they show: one size rule, the stacked memory bar (several models on a GPU,
other processes, free), the GPU's state while its model starts, the cards in GPU order, "system" as the owner of
an instance nobody asked for, and the small fixes around them (favicon, playground link, copy buttons)."""

import json
from types import SimpleNamespace

import pytest

from gpus.models import Gpu
from models_app.formatting import format_mib, format_ms
from models_app.memory import refresh_host_memory
from models_app.models import GpuInstance, ModelConfig
from models_app.web.gpu_memory import memory_segments
from tests.api.factories import make_instance
from tests.conftest import HOST_NAME

HTMX = {"HTTP_HX_REQUEST": "true", "HTTP_HX_CURRENT_URL": "http://testserver/"}


@pytest.mark.parametrize(
    "mib, text",
    [
        (None, "—"),
        (0, "0 MiB"),
        (0.45, "461 KiB"),
        (340, "340 MiB"),
        (1023, "1023 MiB"),
        (1024, "1.0 GiB"),
        (24564, "24.0 GiB"),
    ],
)
def test_one_size_rule(mib, text):
    assert format_mib(mib) == text


def test_durations_read_in_seconds_from_one_second():
    assert (format_ms(None), format_ms(850), format_ms(37255)) == ("–", "850 ms", "37.3 s")


def test_segments_of_a_gpu_with_two_models_others_and_free():
    gpu = SimpleNamespace(
        memory_total_mib=24564,
        memory_used_mib=6000,
        processes=[
            {"pid": 1, "owner": "instance", "instance_id": 7, "used_mib": 3000},
            {"pid": 2, "owner": "instance", "instance_id": 9, "used_mib": 1500},
            {"pid": 3, "owner": "instance", "instance_id": 7, "used_mib": 500},  # a second process of #7
            {"pid": 4, "owner": "foreign", "used_mib": 900},
        ],
    )
    segments = memory_segments(gpu, {7: "Gemma", 9: "Llama"})
    assert [(s.kind, s.instance_id, s.mib) for s in segments] == [
        ("model", 7, 3500), ("model", 9, 1500), ("others", None, 1000), ("free", None, 18564),
    ]  # fmt: skip
    assert sum(s.mib for s in segments) == 24564
    assert segments[0].title == "Gemma (#7): 3.4 GiB (14.2%)"
    assert memory_segments(SimpleNamespace(memory_total_mib=0, memory_used_mib=None, processes=[]), {}) == []


def as_viewer(client, users):
    client.force_login(users["viewer"])
    return client


def test_live_part_has_the_cards_but_not_the_form(client, users, fake_gpus, tiny_model):
    client.force_login(users["operator"])
    live = client.get("/?part=live", **HTMX).content.decode()
    full = client.get("/", **HTMX).content.decode()
    assert 'id="dashboard-live"' in live and 'id="load-form"' not in live
    assert 'id="dashboard-live"' in full and 'id="load-form"' in full
    signature = live.split('data-form-signature="')[1].split('"')[0]
    assert (
        f'data-form-signature="{signature}"' in full.split('id="load-form"')[1]
    )  # the form carries the same


def test_form_signature_changes_when_a_gpu_is_taken(client, users, fake_gpus, tiny_model):
    client.force_login(users["operator"])

    def signature():
        return client.get("/?part=live", **HTMX).content.decode().split('data-form-signature="')[1][:12]

    before = signature()
    make_instance([fake_gpus.gpus[1]], tiny_model)
    assert signature() != before


def test_gpu_card_shows_its_model_starting_and_the_bar(client, users, fake_gpus, tiny_model):
    viewer_client = as_viewer(client, users)
    gpu = fake_gpus.gpus[0]
    instance = make_instance([gpu], tiny_model, status=GpuInstance.Status.STARTING)
    processes = [
        {"pid": 5, "name": "llama-server", "owner": "instance", "instance_id": instance.pk, "used_mib": 2048}
    ]
    Gpu.objects.filter(pk=gpu.pk).update(state="idle", memory_used_mib=2100, processes=processes)
    page = viewer_client.get("/?part=live", **HTMX).content.decode()
    card = page.split(f'id="gpu-{gpu.pk}"')[1].split("</article>")[0]
    assert (
        'data-state="idle"' in page and '<span class="badge badge-starting gpu-state">Starting</span>' in card
    )
    assert f'data-kind="model" data-mib="2048" data-instance="{instance.pk}"' in card
    assert "2.1 GiB</span> / 24.0 GiB used (whole GPU)" in card
    assert "Owner</dt><dd>system</dd>" in page  # make_instance without an owner: loaded by the controller


def test_model_cards_follow_gpu_order(client, users, fake_gpus, tiny_model):
    viewer_client = as_viewer(client, users)
    other = ModelConfig.objects.create(id="tiny2", name="Second", path=tiny_model.path)
    on_gpu1 = make_instance([fake_gpus.gpus[1]], tiny_model)  # asked for first
    on_gpu0 = make_instance([fake_gpus.gpus[0]], other)
    page = viewer_client.get("/?part=live", **HTMX).content.decode()
    assert page.index(f'id="instance-{on_gpu0.pk}"') < page.index(f'id="instance-{on_gpu1.pk}"')


def test_running_card_has_copy_buttons_and_the_playground(client, users, fake_gpus, tiny_model):
    viewer_client = as_viewer(client, users)
    instance = make_instance([fake_gpus.gpus[0]], tiny_model)
    page = viewer_client.get("/").content.decode()
    for block in ("curl", "openai", "ollama"):
        assert f'data-copy="#{block}-{instance.pk}"' in page
    assert f"/instances/{instance.pk}/playground/" in page
    assert "v1/chat/completions \\\n" in page  # one option per line: no break in the middle of the URL


def test_favicon(client):
    response = client.get("/favicon.ico")
    assert response.status_code == 301 and response["Location"].endswith(".svg")


def test_utilisation_temperature_and_power_where_the_backend_gives_them(client, users, fake_gpus):
    """The fake backend passes them on from its file (NVML reads them from the driver); "—" without."""
    data = json.loads(fake_gpus.path.read_text())
    data["gpus"][0].update(utilization_pct=37, temperature_c=61, power_w=182)
    fake_gpus.path.write_text(json.dumps(data))
    refresh_host_memory(HOST_NAME)
    client.force_login(users["viewer"])
    gpu0 = client.get(f"/api/v1/gpus/{fake_gpus.gpus[0].pk}/").json()
    assert (gpu0["utilization_pct"], gpu0["temperature_c"], gpu0["power_w"]) == (37, 61, 182)
    page = client.get("/?part=live", **HTMX).content.decode()
    card0 = page.split(f'id="gpu-{fake_gpus.gpus[0].pk}"')[1].split("</article>")[0]
    card1 = page.split(f'id="gpu-{fake_gpus.gpus[1].pk}"')[1].split("</article>")[0]
    assert '<span class="gpu-util">37 %</span>' in card0 and "61 °C" in card0 and "182 W" in card0
    assert '<span class="gpu-util">—</span>' in card1 and 'gpu-temperature">—' in card1


def test_a_gpu_freed_by_an_unload_is_offered_before_the_telemetry_catches_up(
    client, users, fake_gpus, tiny_model
):
    """The suggestion (placement) counts a GPU without an active instance as free; so does the form, even while
    the GPU row still says "Model loaded" from the last sample."""
    instance = make_instance([fake_gpus.gpus[0]], tiny_model)
    GpuInstance.objects.filter(pk=instance.pk).update(status=GpuInstance.Status.STOPPED)
    instance.gpu_links.update(active=False)
    assert Gpu.objects.get(pk=fake_gpus.gpus[0].pk).state == "model_loaded"
    client.force_login(users["operator"])
    page = client.get("/", **HTMX).content.decode()
    assert 'value="testhost:0" data-index="0"\n               >' in page  # not disabled
