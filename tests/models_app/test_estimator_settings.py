"""Issue 17 (items 6 and 7): the estimator's settings refuse what llama-server refuses or would misread (a
quantized V cache without flash attention, non-finite tensor splits, non-ASCII digits, unknown split modes),
switches follow cli_params' null/false, and the breakdown counts blocks and the output layer apart."""

import pytest

from models_app import estimates, estimator
from models_app.estimator import GgufFacts

FACTS = GgufFacts(
    path="x.gguf",
    architecture="llama",
    metadata={
        "llama.block_count": 4, "llama.context_length": 1024, "llama.embedding_length": 256,
        "llama.feed_forward_length": 512, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 4,
    },
    tensors={"token_embd.weight": 1000, "output.weight": 1000, **{f"blk.{i}.w": 100 for i in range(4)}},
)  # fmt: skip


@pytest.mark.parametrize("ctv", ["q8_0", "q4_0", "q5_1", "iq4_nl"])
@pytest.mark.parametrize("fa", ["off", "0", "false"])
def test_a_quantized_v_cache_needs_flash_attention(ctv, fa):
    with pytest.raises(estimator.EstimateError, match="quantized V cache requires flash_attn"):
        estimator.settings_for(FACTS, {"flash-attn": fa, "cache-type-v": ctv})
    for on in ("on", "auto"):  # llama.cpp's default, auto, turns it on where the device can
        assert estimator.settings_for(FACTS, {"flash-attn": on, "cache-type-v": ctv}).cache_v == ctv
    # A quantized K cache alone is allowed without it, as llama.cpp allows it.
    assert not estimator.settings_for(FACTS, {"flash-attn": fa, "cache-type-k": ctv}).flash_attn


@pytest.mark.parametrize("ts", ["nan,1", "1,inf", "-inf", "1e999,1", "１,1", "1,,x", ""])
def test_a_tensor_split_must_be_finite_ascii_numbers(ts):
    with pytest.raises(estimator.EstimateError, match="tensor-split"):
        estimator.tensor_split(ts)
    assert estimator.tensor_split("3,1") == [3.0, 1.0] and estimator.tensor_split("0.5/.5") == [0.5, 0.5]
    assert estimator.tensor_split("1e2,1") == [100.0, 1.0]


@pytest.mark.parametrize("value", ["１００", "٣", "1_000", "1.5", " ", "+"])
def test_whole_numbers_are_ascii_digits(value):
    with pytest.raises(estimator.EstimateError, match="not a whole number"):
        estimator.settings_for(FACTS, {"ctx-size": value})
    with pytest.raises(estimator.EstimateError, match="not a whole number"):
        estimates.parse_overrides({"c": value})
    assert estimator.settings_for(FACTS, {"ctx-size": " 512 "}).n_ctx == 512
    assert estimator.settings_for(FACTS, {"ctx-size": 512}).n_ctx == 512


def test_switches_and_split_modes():
    assert not estimator.settings_for(FACTS, {"no-kv-offload": None}).kv_offload  # cli_params' bare flag
    assert estimator.settings_for(FACTS, {"no-kv-offload": False}).kv_offload  # false leaves it out
    assert estimator.settings_for(FACTS, {"swa-full": True}).swa_full
    assert estimator.settings_for(FACTS, {"split-mode": "ROW"}).split_mode == "row"
    with pytest.raises(estimator.EstimateError, match="split-mode: 'diagonal'"):
        estimator.settings_for(FACTS, {"split-mode": "diagonal"})


def test_no_kv_offload_moves_the_kv_cache_to_the_host():
    on = estimator.estimate(FACTS, {"ctx-size": 1024}, gpus=1)
    off = estimator.estimate(FACTS, {"ctx-size": 1024, "no-kv-offload": None}, gpus=1)
    assert on.devices[0].kv > 0 and on.host.kv == 0
    assert off.devices[0].kv == 0 and off.host.kv == on.devices[0].kv
    assert off.devices[0].weights == on.devices[0].weights


def test_the_breakdown_counts_blocks_and_the_output_layer_apart():
    full = estimator.estimate(FACTS, {}, gpus=1).as_dict()
    assert full["gpus"][0]["layers"] == 4 and full["gpus"][0]["output_layer"] is True
    assert full["host"]["layers"] == 0 and full["host"]["output_layer"] is False
    partial = estimator.estimate(FACTS, {"gpu-layers": 2}, gpus=1).as_dict()  # 1 block + output
    assert partial["gpus"][0]["layers"] == 1 and partial["host"]["layers"] == 3
    cpu = estimator.estimate(FACTS, {}, gpus=0).as_dict()
    assert cpu["host"]["layers"] == 4 and cpu["host"]["output_layer"] is True


def test_parse_overrides_refuses_names_it_does_not_know():
    with pytest.raises(estimator.EstimateError, match="ngll: not a flag an estimate takes"):
        estimates.parse_overrides({"ngll": "10"})
    assert estimates.parse_overrides({"nkvo": "1", "kvu": "0"}) == {
        "no-kv-offload": True, "kv-unified": False, "no-kv-unified": True,
    }  # fmt: skip
