"""Inventory: a replaced GPU (another uuid at its index) never leaves two rows answering to one index."""

import json

import pytest
from django.db import IntegrityError, transaction

from gpus import services
from gpus.models import Gpu
from models_app.memory import refresh_host_memory
from models_app.services import resolve_gpus
from tests.conftest import FAKE_GPU_UUIDS, HOST_NAME

NEW_CARD = "GPU-11111111-new0-0000-0000-000000000001"


def _rewrite(fake_gpus, change):
    data = json.loads(fake_gpus.path.read_text())
    change(data["gpus"])
    fake_gpus.path.write_text(json.dumps(data))


def test_replaced_gpu_gives_its_index_to_the_new_card(fake_gpus):
    def replace_gpu_1(gpus):
        gpus[1]["uuid"] = NEW_CARD

    _rewrite(fake_gpus, replace_gpu_1)
    refresh_host_memory(HOST_NAME)
    assert Gpu.objects.filter(host=fake_gpus.host, index=1).count() == 1
    new = Gpu.objects.get(uuid=NEW_CARD)
    old = Gpu.objects.get(uuid=FAKE_GPU_UUIDS[1])  # kept: its history and instances stay
    assert (new.index, new.state) == (1, Gpu.State.IDLE)
    assert (old.index, old.state) == (None, Gpu.State.UNAVAILABLE)
    assert old.state_reason == f"replaced: GPU 1 of testhost is now {NEW_CARD}"
    assert str(old) == "testhost:replaced Simulated RTX 4090"
    assert resolve_gpus([1], None)[1] == [new]
    refresh_host_memory(HOST_NAME)  # a second pass keeps it so
    old.refresh_from_db()
    assert (old.index, old.state_reason) == (None, f"replaced: GPU 1 of testhost is now {NEW_CARD}")


def test_replacement_seen_when_the_worker_starts(fake_gpus):
    def replace_gpu_0(gpus):
        gpus[0]["uuid"] = NEW_CARD

    _rewrite(fake_gpus, replace_gpu_0)
    services.register_host(HOST_NAME)
    assert list(Gpu.objects.filter(host=fake_gpus.host, index=0).values_list("uuid", flat=True)) == [NEW_CARD]
    assert Gpu.objects.get(uuid=FAKE_GPU_UUIDS[0]).index is None


def test_renumbered_gpus_swap_indices(fake_gpus):
    def swap(gpus):
        gpus[0]["index"], gpus[1]["index"] = 1, 0

    _rewrite(fake_gpus, swap)
    refresh_host_memory(HOST_NAME)
    assert dict(Gpu.objects.values_list("uuid", "index")) == {FAKE_GPU_UUIDS[0]: 1, FAKE_GPU_UUIDS[1]: 0}
    assert not Gpu.objects.filter(state=Gpu.State.UNAVAILABLE).exists()


def test_a_vanished_gpu_keeps_its_index_until_another_card_takes_it(fake_gpus):
    _rewrite(fake_gpus, lambda gpus: gpus.pop())
    refresh_host_memory(HOST_NAME)
    gone = Gpu.objects.get(uuid=FAKE_GPU_UUIDS[1])
    assert (gone.index, gone.state_reason) == (1, "GPU not reported by the driver any more")


def test_the_database_refuses_two_rows_at_one_index(fake_gpus):
    with pytest.raises(IntegrityError), transaction.atomic():
        Gpu.objects.create(host=fake_gpus.host, index=0, uuid="GPU-duplicate", name="x")
    Gpu.objects.create(host=fake_gpus.host, index=None, uuid="GPU-retired-1", name="x")
    Gpu.objects.create(host=fake_gpus.host, index=None, uuid="GPU-retired-2", name="x")  # no index: no claim
