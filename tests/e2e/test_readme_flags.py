"""The README's flags load a real model: `{c: 512, ngl: 99}` through the real Celery worker and the real
llama-server (`--ngl` used to make llama-server exit with `error: invalid argument: --ngl`). The worker
discovers its binaries at start, and the server it starts sees none of the controller's secrets."""

import pytest

from models_app import processes
from models_app.models import GpuInstance, LlamaBinary
from models_app.services import request_load, request_unload
from tests.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

Status = GpuInstance.Status


def test_readme_flags_load_through_the_worker(
    celery_worker, fake_gpus, tiny_model, llama_server_path, settings
):
    # The worker found and verified its llama-server when it started.
    default = LlamaBinary.objects.get(host=fake_gpus.host, is_default=True)
    assert default.path == llama_server_path and default.version and not default.error
    tiny_model.cli_params = {"c": 512, "ngl": 99}
    tiny_model.save()
    instance = wait_for(
        request_load(model_id="tiny", gpu_spec="0", actor=None), Status.RUNNING, Status.FAILED
    )
    try:
        assert instance.status == Status.RUNNING, instance.error
        assert instance.argv[1:5] == ["-c", "512", "-ngl", "99"]
        assert processes.health_status(instance.port) == 200
        with open(f"/proc/{instance.pid}/environ", "rb") as handle:
            names = {item.split(b"=", 1)[0].decode() for item in handle.read().split(b"\0") if b"=" in item}
        # The worker has all of these (tests/conftest.py worker_env); the server gets none of them.
        assert not names & {"SECRET_KEY", "DATABASE_URL", "REDIS_URL", "LLAMACONTROLLER_DATA_DIR"}
        assert {"PATH", "CUDA_VISIBLE_DEVICES", "LLAMA_API_KEY", "LLAMACONTROLLER_INSTANCE_ID"} <= names
    finally:
        request_unload(instance=instance, actor=None)
        wait_for(instance, Status.STOPPED, Status.FAILED)
    assert not processes.is_alive(instance.pid, instance.process_create_time)
