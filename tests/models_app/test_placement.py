"""Placement ranks GPU sets by the memory left after the model's estimate (single GPUs first, idle ones before
those shared with other people's processes, then the smallest set that fits) and explains the ranking;
calibration corrects the next estimate by what recent loads of the model on that kind of GPU measured."""

import pytest
from django.utils import timezone

from gpus.models import Gpu, Host
from models_app import estimates, placement
from models_app.memory import check_estimate
from models_app.models import GpuInstance, InstanceEvent, LlamaBinary, ModelConfig
from tests.gguf_helpers import write_llama8b
from tests.helpers import refused

TRAIN = [{"pid": 4242, "name": "train.py", "used_mib": 12288, "owner": "foreign"}]


@pytest.fixture
def host(fake_gpus, tmp_path):
    host = fake_gpus.host
    Host.objects.filter(pk=host.pk).update(last_seen=timezone.now())
    LlamaBinary.objects.create(
        host=host, name="default", path=str(tmp_path / "llama-server"), is_default=True, version="b1"
    )
    Gpu.objects.filter(host=host).update(memory_used_mib=10, state=Gpu.State.IDLE)
    return host


@pytest.fixture
def big_model(db, tmp_path):
    """A Llama-3-8B-class Q4_K_M (sparse file): ≈ 5.4 GiB on one GPU at 2048 tokens."""
    path = write_llama8b(tmp_path / "llama8b.gguf")
    return ModelConfig.objects.create(id="llama8b", name="Llama 8B", path=str(path), cli_params={"c": 2048})


def add_gpu(host, index, total, used=10, **fields):
    return Gpu.objects.create(
        host=host, index=index, uuid=f"GPU-x-{index}", name="Simulated RTX 4090", memory_total_mib=total,
        memory_used_mib=used, **fields,
    )  # fmt: skip


def test_single_gpus_rank_by_memory_left_and_explain(host, big_model):
    Gpu.objects.filter(host=host, index=0).update(memory_used_mib=12298, processes=TRAIN)
    choices, out = placement.rank(big_model)
    assert [c.prediction.gpu_label() for c in choices] == ["1", "0"]  # 0 is shared with train.py
    best, shared = choices
    estimate = best.prediction.total_mib
    assert 5000 < estimate < 6500
    assert best.explain() == (
        # to spare: after its claim (the estimate and LLAMACONTROLLER_GPU_HEADROOM_MIB, 512 by default)
        f"GPU 1 on testhost: fits with {(24554 - estimate - 512) / 1024:.1f} GiB to spare "
        f"(≈ {estimate / 1024:.1f} GiB)"
    )
    assert shared.explain().endswith("; GPU 0: 12.0 GiB used by train.py") and shared.fits
    assert placement.choose_gpus(big_model)[1][0].index == 1
    assert best.prediction.summary() == f"≈ {estimate / 1024:.1f} GiB on GPU 1: fits, 24.0 GiB free"


def test_occupied_gpu_that_fits_is_used_when_nothing_else_does(host, big_model):
    Gpu.objects.filter(host=host, index=0).update(
        memory_used_mib=12298, processes=TRAIN, state=Gpu.State.OCCUPIED_BY_OTHERS
    )
    Gpu.objects.filter(host=host, index=1).update(memory_used_mib=24000)
    assert [g.index for g in placement.choose_gpus(big_model)[1]] == [0]
    assert (
        "after train.py" not in estimates.predict(big_model, [Gpu.objects.get(host=host, index=0)]).summary()
    )


def test_the_smallest_set_that_fits_when_no_single_gpu_does(host, big_model):
    Gpu.objects.filter(host=host).delete()
    for index in range(4):
        add_gpu(host, index, total=4096, used=10 + index)
    choices, _ = placement.rank(big_model)
    assert not any(c.fits for c in choices if len(c.gpus) == 1)
    pair = choices[0]
    assert len(pair.gpus) == 2 and pair.fits  # 3 or 4 GPUs would fit too; the smallest set wins
    # llama.cpp's default split follows free memory; each GPU carries its share plus compute and context.
    assert all(need < 4096 for need in pair.prediction.per_gpu_mib)
    chosen_host, gpus = placement.choose_gpus(big_model)
    assert [g.index for g in gpus] == [0, 1]


def test_nothing_fits_is_no_capacity_with_the_numbers(host, big_model):
    Gpu.objects.filter(host=host).update(memory_total_mib=2048)
    with refused("busy") as caught:
        placement.choose_gpus(big_model)
    assert "GPU 0 on testhost: too little memory (needs ≈ " in caught.value.message
    assert "MiB, 2038 MiB free)" in caught.value.message


def test_calibration_learns_from_measured_loads(host, big_model, users):
    gpu0 = Gpu.objects.get(host=host, index=0)
    first = estimates.predict(big_model, [gpu0])
    assert first.loads == 0 and first.factor == 1.0
    # A load that measured 10 % more than the formula said.
    instance = GpuInstance.objects.create(
        model=big_model, host=host, gpu_ids="0", status=GpuInstance.Status.RUNNING,
        memory_estimated_mb=first.total_mib, memory_estimate=first.stored(),
        memory_used_mb=round(first.total_mib * 1.1), memory_source="process",
    )  # fmt: skip
    check_estimate(instance)
    instance.refresh_from_db()
    assert instance.memory_measured_mb == round(first.total_mib * 1.1)
    assert instance.memory_estimate_error_pct == pytest.approx(10.0, abs=0.1)
    event = instance.events.get(kind=InstanceEvent.Kind.ESTIMATE)
    assert f"estimated {first.total_mib} MiB" in event.detail and "error +10.0 %" in event.detail
    second = estimates.predict(big_model, [gpu0])
    assert second.loads == 1 and second.factor == pytest.approx(1.1, abs=0.001)
    assert second.total_mib == pytest.approx(first.total_mib * 1.1, abs=2)
    assert "(corrected ×1.10 from 1 loads)" in second.summary()
    # Another kind of GPU or another llama.cpp version learns nothing from it.
    Gpu.objects.filter(pk=gpu0.pk).update(name="H100")
    assert estimates.predict(big_model, [Gpu.objects.get(pk=gpu0.pk)]).loads == 0
    LlamaBinary.objects.filter(host=host).update(version="b2")
    Gpu.objects.filter(pk=gpu0.pk).update(name="Simulated RTX 4090")
    assert estimates.predict(big_model, [Gpu.objects.get(pk=gpu0.pk)]).loads == 0


def test_overrides_are_checked_and_named(db):
    assert estimates.parse_overrides({"c": "8192", "ctk": "q8_0"}) == {
        "ctx-size": 8192,
        "cache-type-k": "q8_0",
    }
    with pytest.raises(estimates.estimator.EstimateError, match="c: 'abc' is not a whole number"):
        estimates.parse_overrides({"c": "abc"})
    with pytest.raises(estimates.estimator.EstimateError, match="cache-type-v: unknown cache type"):
        estimates.parse_overrides({"ctv": "zz"})


def test_estimate_command(host, big_model, capsys):
    from django.core.management import call_command
    from django.core.management.base import CommandError

    call_command("estimate", "llama8b", "--gpu", "0", "-c", "8192")
    out = capsys.readouterr().out
    assert out.startswith("≈ ") and "on GPU 0: fits, 24.0 GiB free" in out
    assert "GPU 0: weights 4403.5 MiB, KV 1024.0 MiB" in out and "host: weights 281.8 MiB" in out
    call_command("estimate", "llama8b")
    assert "suggestion: GPU 0 on testhost" in capsys.readouterr().out
    with pytest.raises(CommandError, match="c: 'x' is not a whole number"):
        call_command("estimate", "llama8b", "-c", "x")
    with pytest.raises(CommandError, match="unknown model"):
        call_command("estimate", "nope")


def test_without_a_context_flag_the_context_is_lowered_to_fit_as_llama_server_does(host, big_model):
    gpu0 = Gpu.objects.get(host=host, index=0)
    full = estimates.predict(big_model, [gpu0], {"ctx-size": 8192}).total_mib
    floor = estimates.predict(big_model, [gpu0], {"ctx-size": 4096}).total_mib
    Gpu.objects.filter(pk=gpu0.pk).update(memory_total_mib=10 + (full + floor) // 2)
    gpu0.refresh_from_db()
    ModelConfig.objects.filter(pk=big_model.pk).update(cli_params={})  # no -c: the trained 8192 tokens
    big_model.refresh_from_db()
    lowered = estimates.predict(big_model, [gpu0])
    assert lowered.fits is True and 4096 <= lowered.estimate.settings.n_ctx < 8192
    assert lowered.estimate.settings.n_ctx % 256 == 0
    assert "llama-server's --fit lowers the trained 8192 to fit" in lowered.summary()
    ModelConfig.objects.filter(pk=big_model.pk).update(cli_params={"fit": "off"})
    big_model.refresh_from_db()
    assert estimates.predict(big_model, [gpu0]).fits is False
    Gpu.objects.filter(pk=gpu0.pk).update(memory_total_mib=floor - 100)
    gpu0.refresh_from_db()
    ModelConfig.objects.filter(pk=big_model.pk).update(cli_params={})
    big_model.refresh_from_db()
    assert estimates.predict(big_model, [gpu0]).fits is False  # not even at --fit-ctx
