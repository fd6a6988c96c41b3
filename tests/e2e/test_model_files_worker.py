"""Model files per host through a real worker on real Redis: the worker reports the registered models at
start, and a registry change makes it report again within seconds (not at its next reconcile pass)."""

import time

import pytest

from models_app.models import HostModelFile
from tests.conftest import HOST_NAME

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def wait_for_row(model, available: bool, timeout: float = 20.0) -> HostModelFile:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = HostModelFile.objects.filter(host__name=HOST_NAME, model=model).first()
        if row is not None and row.available is available:
            return row
        time.sleep(0.1)
    raise AssertionError(f"no report available={available} from the worker within {timeout}s")


def test_a_worker_reports_at_start_and_after_a_registry_change(start_worker, tiny_model, settings):
    start_worker()
    assert wait_for_row(tiny_model, True).size_bytes == tiny_model.file_size_bytes

    # On commit of the change, check_model_files goes to every live host's queue.
    tiny_model.path = str(settings.MODEL_DIRS[0] / "not-on-this-host.gguf")
    tiny_model.save()
    row = wait_for_row(tiny_model, False, timeout=10.0)
    assert row.reason == f"{tiny_model.path} does not exist there"
