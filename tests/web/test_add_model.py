"""The "Add a model" page (admins only): the GGUF files of the model folders with their facts and the predicted
memory per GPU, and registration through the registry's rules (issue 21)."""

import shutil

import pytest

from models_app.models import ModelConfig


@pytest.fixture
def second_file(tiny_model_file):
    """Another GGUF file in the model folder, not registered yet."""
    path = tiny_model_file.with_name("second-tiny.gguf")
    shutil.copy(tiny_model_file, path)
    yield path
    path.unlink(missing_ok=True)


@pytest.mark.parametrize("who, status", [("viewer", 403), ("operator", 403), ("admin", 200)])
def test_only_admins_see_the_page(client, users, fake_gpus, who, status):
    client.force_login(users[who])
    assert client.get("/models/add/").status_code == status


def test_lists_files_with_facts_and_estimates(client, users, live, tiny_model, second_file):
    client.force_login(users["admin"])
    page = client.get("/models/add/").content.decode()
    row = page.split(f'data-path="{second_file}"')[1].split("</tr>")[0]
    assert "second-tiny.gguf" in row and "llama" in row and "Register…" in row
    assert "MiB on GPU 0" in row and "MiB on GPU 1" in row  # the prediction on each GPU of the live host
    registered = page.split(f'data-path="{tiny_model.path}"')[1].split("</tr>")[0]
    assert "registered as tiny" in registered


def test_register_then_the_load_form_offers_it(client, users, live, second_file):
    client.force_login(users["admin"])
    response = client.post(
        "/models/add/", {"id": "second", "name": "Second tiny", "path": str(second_file), "cli_params": "{}"}
    )
    assert response.status_code == 302 and response["Location"].endswith("/#load-heading")
    model = ModelConfig.objects.get(pk="second")
    assert model.path == str(second_file) and model.gguf_metadata["architecture"] == "llama"
    assert '<option value="second">Second tiny (second)</option>' in client.get("/").content.decode()


def test_register_refuses_what_the_registry_refuses(client, users, live, tmp_path):
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    client.force_login(users["admin"])
    response = client.post("/models/add/", {"id": "x", "name": "X", "path": str(outside), "cli_params": "{}"})
    assert response.status_code == 400 and not ModelConfig.objects.filter(pk="x").exists()
    assert "alert-error" in response.content.decode()


def test_corrupt_gguf_files_in_the_folder_leave_the_page_working(client, users, live, tiny_model, settings):
    """Random bytes after the magic (a truncated download, a test's broken file): each one is listed as
    unreadable, never a 500 (seeded: the same 20 files every run)."""
    import random

    rng = random.Random(21)
    folder = settings.MODEL_DIRS[0] / "corrupt"
    folder.mkdir(exist_ok=True)
    paths = []
    for n in range(20):
        path = folder / f"corrupt-{n}.gguf"
        path.write_bytes(b"GGUF" + rng.randbytes(rng.choice([8, 64, 4096])))
        paths.append(path)
    try:
        client.force_login(users["admin"])
        page = client.get("/models/add/")
        assert page.status_code == 200
        assert all(f'data-path="{p}"' in page.content.decode() for p in paths)
    finally:
        shutil.rmtree(folder)
