"""Issue 17 (items 7 and 9): `manage.py estimate`: with --json only JSON (without --gpu the ranking too), with
no GPU that fits a truthful line, and the layer count of the breakdown (blocks, plus the output layer)."""

import json
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from gpus.models import Gpu


def run(*args) -> str:
    out = StringIO()
    call_command("estimate", *args, stdout=out)
    return out.getvalue()


def test_json_without_gpu_is_json_only_with_the_ranking(live, tiny_model):
    data = json.loads(run("tiny", "--json"))
    assert data["gpu_ids"] in ("0", "1") and data["fits"] is True
    assert [c["gpu_ids"] for c in data["ranking"]] and data["unavailable"] == []
    assert data["ranking"][0]["gpu_ids"] == data["gpu_ids"]
    with_gpu = json.loads(run("tiny", "--gpu", "1", "--json"))
    assert with_gpu["gpu_ids"] == "1" and "ranking" not in with_gpu


def test_every_gpu_busy_says_no_gpu_fits(live, tiny_model):
    Gpu.objects.filter(host=live.host).update(memory_used_mib=24560)
    text = run("tiny")
    assert "no GPU fits: GPU " in text and "fits, 0 MiB free" not in text and "on GPU :" not in text
    data = json.loads(run("tiny", "--json"))
    assert data["fits"] is False and data["gpu_ids"] == "" and data["summary"].startswith("no GPU fits")


def test_the_breakdown_counts_blocks_and_the_output_layer_apart(live, tiny_model):
    text = run("tiny", "--gpu", "0")
    assert "(2 layers + output)" in text  # the tiny model has 2 blocks
    assert "(0 layers)" in text  # the host


def test_bad_input_is_a_command_error(live, tiny_model):
    with pytest.raises(CommandError, match="not a whole number"):
        run("tiny", "-c", "１００")
    with pytest.raises(CommandError, match="unknown host"):
        run("tiny", "--host", "nowhere")
