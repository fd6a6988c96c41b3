"""Issue 17 (items 6 and 7): the estimate endpoints refuse what llama-server would refuse or what they would
otherwise ignore: non-finite tensor splits, unknown parameters, a quantized V cache without flash attention,
non-ASCII digits; they take every memory flag the README lists (nkvo keeps the KV cache off the GPUs); and
without a GPU that fits they say so instead of "fits" on no GPU."""

import pytest
from rest_framework.test import APIClient

from gpus.models import Gpu


@pytest.fixture
def viewer(users):
    client = APIClient()
    client.force_login(users["viewer"])
    return client


def estimate(client, model, query):
    return client.get(f"/api/v1/models/{model.pk}/estimate/?{query}")


@pytest.mark.parametrize("ts", ["nan,1", "inf,1", "1e999,1", "1,-inf", "１,1"])
def test_a_tensor_split_that_is_not_finite_is_400(live, tiny_model, viewer, ts):
    response = estimate(viewer, tiny_model, f"gpu_id=0,1&ts={ts}")
    assert response.status_code == 400, response.content
    assert "ts" in response.json()


@pytest.mark.parametrize("query", ["gpu_id=0&ngll=10", "gpu_id=0&nkvo=1&bogus=2", "c=512&gpu=0"])
def test_unknown_parameters_are_400_naming_them(live, tiny_model, viewer, query):
    response = estimate(viewer, tiny_model, query)
    assert response.status_code == 400, response.content
    unknown = [p.split("=")[0] for p in query.split("&")][-1]
    assert f"unknown parameter '{unknown}'" in response.json()["detail"]
    placement = viewer.get(f"/api/v1/models/{tiny_model.pk}/placement/?{query.replace('gpu_id=0&', '')}")
    assert placement.status_code == 400 and "unknown parameter" in placement.json()["detail"]


def test_nkvo_keeps_the_kv_cache_in_host_memory(live, tiny_model, viewer):
    on_gpu = estimate(viewer, tiny_model, "gpu_id=0&c=8192").json()["breakdown"]
    off_gpu = estimate(viewer, tiny_model, "gpu_id=0&c=8192&nkvo=1").json()["breakdown"]
    # 2 layers x 8192 cells x (64 + 64) x 2 bytes = 4 MiB
    assert on_gpu["gpus"][0]["kv_mib"] == 4.0 and on_gpu["host"]["kv_mib"] == 0
    assert off_gpu["gpus"][0]["kv_mib"] == 0 and off_gpu["host"]["kv_mib"] == 4.0
    assert off_gpu["settings"]["kv_offload"] is False
    assert estimate(viewer, tiny_model, "gpu_id=0&nkvo=0").json()["breakdown"]["settings"]["kv_offload"]
    assert estimate(viewer, tiny_model, "gpu_id=0&nkvo=maybe").status_code == 400


def test_every_memory_flag_of_the_readme_is_taken(live, tiny_model, viewer):
    query = "gpu_id=0,1&c=1024&ngl=99&ctk=f16&ctv=f16&fa=on&np=2&b=512&ub=256&sm=row&ts=3,1&nkvo=0&swa-full=1&kvu=1"
    response = estimate(viewer, tiny_model, query)
    assert response.status_code == 200, response.content
    settings = response.json()["breakdown"]["settings"]
    assert settings["split_mode"] == "row" and settings["swa_full"] is True and settings["kv_unified"] is True
    assert settings["n_seq"] == 2 and settings["n_ubatch"] == 256 and settings["tensor_split"] == [3.0, 1.0]
    assert (
        estimate(viewer, tiny_model, "gpu_id=0&kvu=0").json()["breakdown"]["settings"]["kv_unified"] is False
    )
    assert estimate(viewer, tiny_model, "gpu_id=0&sm=diagonal").status_code == 400


@pytest.mark.parametrize("query", ["fa=off&ctv=q8_0", "fa=off&ctk=q8_0&ctv=q8_0", "ctv=q4_0&fa=false"])
def test_a_quantized_v_cache_without_flash_attention_is_refused_as_llama_server_does(
    live, tiny_model, viewer, query
):
    response = estimate(viewer, tiny_model, f"gpu_id=0&{query}")
    assert response.status_code == 400, response.content
    assert "quantized V cache requires flash_attn" in response.json()["detail"]
    assert "ctv" in response.json()


def test_a_quantized_k_cache_without_flash_attention_is_estimated(live, tiny_model, viewer):
    # llama.cpp checks the V cache only; the tiny model's 64-wide heads take q8_0 blocks of 32.
    assert estimate(viewer, tiny_model, "gpu_id=0&fa=off&ctk=q8_0").status_code == 200


@pytest.mark.parametrize(("query", "field"), [("c=１００", "c"), ("ngl=٣", "ngl"), ("ub=5１2", "ub")])
def test_digits_other_than_ascii_are_400(live, tiny_model, viewer, query, field):
    response = estimate(viewer, tiny_model, f"gpu_id=0&{query}")
    assert response.status_code == 400, response.content
    assert field in response.json() and "not a whole number" in response.json()["detail"]


def test_without_a_gpu_that_fits_the_suggestion_says_so(live, tiny_model, viewer):
    Gpu.objects.filter(host=live.host).update(memory_used_mib=24560)  # every GPU full
    body = estimate(viewer, tiny_model, "").json()
    assert body["fits"] is False and body["gpu_ids"] == "" and body["per_gpu"] == []
    assert (
        body["summary"].startswith("no GPU fits: GPU ") and "fits" not in body["summary"][12:].split(":")[0]
    )
    assert ": fits," not in body["summary"]
