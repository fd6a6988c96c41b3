"""Admission by memory: the claim arithmetic (models_app/claims.py, plain data) and admission through the
services (models_app/admission.py): several models share a GPU while their claims fit, never beyond it, the
same model twice and exclusive models are refused, and on PostgreSQL 40 parallel loads never over-admit."""

import io
import threading
from pathlib import Path

import pytest
import yaml
from django.core.management import CommandError, call_command
from django.db import connection, connections

from gpus.models import Gpu
from models_app import admission, services
from models_app.claims import GpuClaims, Holder, foreign_mib, measured_mib, new_claim_mib
from models_app.errors import Refused
from models_app.models import GpuInstance, InstanceEvent, ModelConfig

# --- the arithmetic, on plain data --------------------------------------------------------------------


def test_a_claim_is_the_estimate_while_loading_then_the_larger_of_estimate_and_measured():
    gpu = GpuClaims(gpu_id=1, index=0, total_mib=24000, foreign_mib=1000, headroom_mib=512)
    loading = Holder(1, "a", "starting", estimate_mib=4000, measured_mib=6000)
    running_small = Holder(2, "b", "running", estimate_mib=4000, measured_mib=3000)
    running_big = Holder(3, "c", "running", estimate_mib=4000, measured_mib=6000)
    not_measured = Holder(4, "d", "running", estimate_mib=4000)
    assert gpu.claim_of(loading) == 4512  # a loading process's memory is still growing
    assert gpu.claim_of(running_small) == 4512
    assert gpu.claim_of(running_big) == 6512
    assert gpu.claim_of(not_measured) == 4512
    unknown = Holder(5, "e", "running", estimate_mib=None, measured_mib=300)
    assert gpu.claim_of(unknown) == 23000  # no estimate: the whole GPU (all that foreign memory leaves)


def test_a_gpu_admits_claims_up_to_its_memory_and_nothing_beside_a_whole_gpu_claim():
    holders = (Holder(1, "a", "running", 10000, 10200), Holder(2, "b", "pending", 5000))
    gpu = GpuClaims(1, 0, total_mib=24000, foreign_mib=1000, holders=holders, headroom_mib=500)
    assert gpu.claimed_mib == 10700 + 5500 and gpu.free_mib == 24000 - 1000 - 16200
    assert gpu.fits(6800) and not gpu.fits(6801)
    assert gpu.left_after_mib(6800) == 0
    assert not gpu.fits(None)  # a model of unknown size only onto a GPU nobody holds
    assert GpuClaims(2, 1, 24000, 0).fits(None)
    whole = GpuClaims(3, 2, 24000, 0, holders=(Holder(9, "x", "running", None),))
    assert not whole.fits(1)
    assert new_claim_mib(4000, 512) == 4512 and new_claim_mib(None, 512) is None


def test_a_gpu_whose_used_memory_is_unknown_is_shared_by_the_rules_alone():
    gpu = GpuClaims(1, 0, 24000, 0, holders=(Holder(1, "a", "running", 30000),), memory_known=False)
    assert gpu.fits(30000) and not gpu.fits(None)
    assert not GpuClaims(1, 0, 24000, 0, holders=(Holder(1, "a", "running", None),), memory_known=False).fits(
        1
    )


def test_conflicts_same_model_sharing_off_and_exclusive():
    gemma = Holder(4, "gemma", "running", 400)
    gpu = GpuClaims(1, 0, 24000, 0, holders=(gemma,))
    assert gpu.conflict("gemma", exclusive=False, sharing=True) == ("same", gemma)
    assert gpu.conflict("tiny", exclusive=False, sharing=True) is None
    assert gpu.conflict("tiny", exclusive=False, sharing=False) == ("sharing_off", gemma)
    assert gpu.conflict("tiny", exclusive=True, sharing=True) == ("exclusive", gemma)
    alone = Holder(5, "big", "running", 400, exclusive=True)
    assert GpuClaims(1, 0, 24000, 0, holders=(alone,)).conflict("tiny", exclusive=False, sharing=True)[0] == (
        "exclusive"
    )
    assert GpuClaims(1, 0, 24000, 0).conflict("tiny", exclusive=True, sharing=False) is None


def test_foreign_memory_is_what_no_instance_of_ours_explains():
    processes = [
        {"pid": 1, "owner": "instance", "instance_id": 7, "used_mib": 300},
        {"pid": 2, "owner": "foreign", "used_mib": 1000},
        {"pid": 3, "owner": "orphan", "used_mib": 200},
    ]
    assert foreign_mib(1800, processes) == 1500  # the driver's 300 MiB not listed count too
    assert foreign_mib(1000, processes) == 1200  # at least the other processes listed
    assert foreign_mib(None, processes) == 1200
    assert measured_mib(processes, 7) == 300 and measured_mib(processes, 8) is None


# --- through the services -----------------------------------------------------------------------------


def model_like(tiny_model, model_id: str, **fields) -> ModelConfig:
    return ModelConfig.objects.create(id=model_id, name=model_id, **{"path": tiny_model.path, **fields})


def gpu0(fake_gpus) -> Gpu:
    return Gpu.objects.get(pk=fake_gpus.gpus[0].pk)


@pytest.fixture
def measured(fake_gpus):
    """The simulated GPUs as after a first telemetry sample: their used memory known (10 MiB each)."""
    Gpu.objects.filter(host=fake_gpus.host).update(memory_used_mib=10)
    return fake_gpus


def test_two_models_share_a_gpu_while_their_claims_fit(measured, fake_gpus, tiny_model, sent, settings):
    first = services.request_load(model_id="tiny", gpu_spec="0", actor=None)
    second = services.request_load(model_id=model_like(tiny_model, "tiny2").pk, gpu_spec="0", actor=None)
    state = admission.gpu_claims([gpu0(fake_gpus)])[fake_gpus.gpus[0].pk]
    assert [h.instance_id for h in state.holders] == [first.pk, second.pk]
    estimates = [i.memory_estimate["per_gpu"][0]["estimated_mib"] for i in (first, second)]
    assert state.claimed_mib == sum(estimates) + 2 * settings.GPU_HEADROOM_MIB
    # the GPU is nearly full: a third claim is refused with the numbers, and admitted when forced
    Gpu.objects.filter(pk=fake_gpus.gpus[0].pk).update(
        memory_used_mib=gpu0(fake_gpus).memory_total_mib - 2000
    )
    third = model_like(tiny_model, "tiny3")
    with pytest.raises(Refused) as refused:
        services.request_load(model_id="tiny3", gpu_spec="0", actor=None)
    assert refused.value.status == 409 and refused.value.field == "gpu_id"
    assert refused.value.message.startswith("tiny3 does not fit on GPU 0 on testhost: it claims ")
    assert f"claimed by tiny (#{first.pk}) and tiny2 (#{second.pk})" in refused.value.message
    forced = services.request_load(model_id=third.pk, gpu_spec="0", actor=None, force=True)
    assert (
        "(forced: tiny3 does not fit on GPU 0" in forced.events.get(kind=InstanceEvent.Kind.REQUESTED).detail
    )


def test_exclusive_models_neither_join_nor_are_joined(measured, fake_gpus, tiny_model, sent):
    model_like(tiny_model, "alone", exclusive=True)
    services.request_load(model_id="tiny", gpu_spec="0", actor=None)
    with pytest.raises(Refused, match="alone is exclusive: it wants its GPUs to itself"):
        services.request_load(model_id="alone", gpu_spec="0", actor=None, force=True)
    held = services.request_load(model_id="alone", gpu_spec="1", actor=None)
    with pytest.raises(
        Refused, match=f"held by instance #{held.pk} \\(alone, pending\\), which wants its GPUs"
    ):
        services.request_load(model_id=model_like(tiny_model, "other").pk, gpu_spec="1", actor=None)
    assert GpuInstance.objects.count() == 2


def test_a_model_without_an_estimate_claims_the_whole_gpu(measured, fake_gpus, tiny_model, sent, settings):
    broken = Path(settings.MODEL_DIRS[0]) / "no-header.gguf"
    broken.parent.mkdir(parents=True, exist_ok=True)
    broken.write_bytes(b"GGUF" + b"\0" * 64)  # no header the estimator can read
    model_like(tiny_model, "unknown", path=str(broken))
    services.request_load(model_id="tiny", gpu_spec="0", actor=None)
    with pytest.raises(Refused, match="unknown does not fit on GPU 0 on testhost: it claims the whole GPU"):
        services.request_load(model_id="unknown", gpu_spec="0", actor=None)
    services.request_load(model_id="unknown", gpu_spec="1", actor=None)
    with pytest.raises(Refused, match="tiny2 does not fit on GPU 1"):
        services.request_load(model_id=model_like(tiny_model, "tiny2").pk, gpu_spec="1", actor=None)


def test_the_gpu_claims_api_lists_instances_with_claimed_measured_and_free(
    measured, fake_gpus, tiny_model, sent, client, users
):
    instance = services.request_load(model_id="tiny", gpu_spec="0", actor=None)
    client.force_login(users["viewer"])
    rows = client.get("/api/v1/gpu-claims/").json()
    first = rows[0]
    assert (first["host"], first["index"], first["memory_known"]) == ("testhost", 0, True)
    (listed,) = first["instances"]
    assert listed["instance_id"] == instance.pk and listed["model_id"] == "tiny"
    assert listed["claimed_mib"] == listed["estimated_mib"] + 512 and listed["measured_mib"] is None
    assert first["claimed_mib"] == listed["claimed_mib"]
    assert first["free_mib"] == first["total_mib"] - first["foreign_mib"] - first["claimed_mib"]
    assert rows[1]["instances"] == []
    metrics = client.get("/metrics").content.decode()
    assert (
        "llamacontroller_gpu_instance_claim_bytes{" in metrics and f'instance_id="{instance.pk}"' in metrics
    )


# --- concurrency: PostgreSQL, 40 loads at once -----------------------------------------------------------

postgres_only = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="row locks are PostgreSQL's (SQLite serialises every write)"
)


def load_all_at_once(model_ids: list[str]) -> tuple[list[GpuInstance], list[Refused], list[Exception]]:
    """request_load of each model onto GPU 0, each in its own thread (its own database connection), all
    released at the same moment."""
    admitted, refused, errors = [], [], []
    start = threading.Barrier(len(model_ids))

    def one(model_id):
        try:
            start.wait()
            admitted.append(services.request_load(model_id=model_id, gpu_spec="0", actor=None))
        except Refused as exc:
            refused.append(exc)
        except Exception as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)
        finally:
            connections.close_all()

    threads = [threading.Thread(target=one, args=(m,)) for m in model_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    return admitted, refused, errors


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_40_parallel_loads_never_admit_claims_beyond_the_gpu(measured, fake_gpus, tiny_model, sent):
    ids = [model_like(tiny_model, f"small-{n:02d}").pk for n in range(40)]
    admitted, refused, errors = load_all_at_once(ids)
    assert not errors, errors
    gpu = gpu0(fake_gpus)
    state = admission.gpu_claims([gpu])[gpu.pk]
    assert len(state.holders) == len(admitted) == GpuInstance.objects.count()
    assert state.claimed_mib + state.foreign_mib <= gpu.memory_total_mib
    claim = state.claim_of(state.holders[0])
    # every refusal is a 409 for memory, and only because the GPU was full
    assert all(r.status == 409 and "does not fit on GPU 0" in r.message for r in refused)
    assert len(admitted) == (gpu.memory_total_mib - state.foreign_mib) // claim
    assert len(admitted) + len(refused) == 40
    print(
        f"\n40 parallel loads at one GPU: {len(admitted)} admitted, {len(refused)} refused (409); claims "
        f"{state.claimed_mib} + foreign {state.foreign_mib} of {gpu.memory_total_mib} MiB"
    )


@postgres_only
@pytest.mark.django_db(transaction=True)
def test_the_same_model_twice_at_once_is_admitted_once(measured, fake_gpus, tiny_model, sent):
    admitted, refused, errors = load_all_at_once(["tiny", "tiny"])
    assert not errors, errors
    assert len(admitted) == 1 and len(refused) == 1
    assert refused[0].status == 409 and refused[0].message.startswith(
        "tiny already runs on GPU 0 on testhost"
    )


# --- exclusive in the registry file --------------------------------------------------------------------


def test_the_registry_file_sets_exclusive_and_refuses_anything_but_true_or_false(tmp_path, db, tiny_model):
    def registry(value) -> str:
        path = tmp_path / "models.yaml"
        entry = {"id": "big", "path": tiny_model.path, "parameters": {"exclusive": value}}
        path.write_text(yaml.safe_dump({"models": [entry]}))
        return str(path)

    with pytest.raises(CommandError, match=r"\(big\): exclusive must be true or false"):
        call_command("import_models", registry("yes"), stdout=io.StringIO())
    call_command("import_models", registry(True), stdout=io.StringIO())
    assert ModelConfig.objects.get(pk="big").exclusive
