"""The admin in words people use: plural names, field labels, readable JSON and times (issue 21)."""

from gpus.models import Gpu
from models_app.models import GpuInstance
from tests.api.factories import make_instance


def test_admin_index_and_labels(client, users, fake_gpus, tiny_model):
    client.force_login(users["admin"])
    index = client.get("/admin/").content.decode()
    assert "Llama-server binaries" in index and "GPU instances" in index and "binarys" not in index
    model_page = client.get(f"/admin/models_app/modelconfig/{tiny_model.pk}/change/").content.decode()
    assert "Command-line flags" in model_page and "Cli params" not in model_page
    assert '<pre class="readable-json">' in model_page  # the GGUF header, indented


def test_instance_page_shows_the_estimate_and_the_process_start_readably(
    client, users, fake_gpus, tiny_model
):
    instance = make_instance([fake_gpus.gpus[0]], tiny_model, process_create_time=1796566762.3)
    estimate = {"gpus": [{"total_mib": 6246.5, "weights_mib": 4000}], "total_gpu_mib": 6246.5}
    GpuInstance.objects.filter(pk=instance.pk).update(memory_estimate=estimate)
    Gpu.objects.filter(pk=fake_gpus.gpus[0].pk).update(
        processes=[{"pid": 1, "owner": "foreign", "used_mib": 5}]
    )
    client.force_login(users["admin"])
    page = client.get(f"/admin/models_app/gpuinstance/{instance.pk}/change/").content.decode()
    assert "Process started" in page and "2026-12-06 " in page and "Process create time" not in page
    assert "GPU 0: 6.1 GiB" in page and '<pre class="readable-json">' in page
    gpu_page = client.get(f"/admin/gpus/gpu/{fake_gpus.gpus[0].pk}/change/").content.decode()
    assert '<pre class="readable-json">' in gpu_page
