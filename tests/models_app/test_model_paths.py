"""Issue 17 (items 6 and 8): every way of adding or changing a model (admin, REST API, import_models) takes the
path the same way (registry.model_file: a relative path is inside the model folders) and saves the GGUF facts
and the file size with it; import_models refuses a name or id longer than the fields hold, naming the entry."""

from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from models_app import registry
from models_app.admin import ModelConfigForm
from models_app.models import ModelConfig
from models_app.testmodel import write_tiny_model


@pytest.fixture
def nested_model():
    """A model file in a sub-folder of the first model folder: `sub/nested.gguf` relative to it."""
    path = Path(settings.MODEL_DIRS[0]) / "sub" / "nested.gguf"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tiny_model(path)
    return path


def assert_saved_with_facts(entry: ModelConfig, path: Path):
    assert entry.path == str(path.resolve())
    assert entry.file_size_bytes == path.stat().st_size > 0
    assert entry.gguf_metadata["architecture"] == "llama" and entry.gguf_metadata["block_count"] == 2


def test_model_file_resolves_a_relative_path_inside_the_model_folders(nested_model):
    values = registry.model_file("sub/nested.gguf")
    assert values["path"] == str(nested_model.resolve()) and values["file_size_bytes"] > 0
    assert values["gguf_metadata"]["architecture"] == "llama"
    with pytest.raises(registry.RegistryError, match="file not found"):
        registry.model_file("sub/missing.gguf")
    with pytest.raises(registry.RegistryError, match="outside the allowed model folders"):
        registry.model_file("../../etc/x.gguf")


@pytest.mark.django_db
@pytest.mark.parametrize("spelling", ["relative", "absolute"])
def test_admin_form_saves_the_resolved_path_and_the_facts(nested_model, spelling):
    path = "sub/nested.gguf" if spelling == "relative" else str(nested_model)
    form = ModelConfigForm(
        data={
            "id": "nested",
            "name": "Nested",
            "path": path,
            "cli_params": "{}",
            "metadata": "{}",
            "max_restarts": 3,
        }  # fmt: skip
    )
    assert form.is_valid(), form.errors
    form.save()
    assert_saved_with_facts(ModelConfig.objects.get(pk="nested"), nested_model)


@pytest.mark.django_db
def test_admin_change_reads_the_new_files_facts(nested_model, tiny_model_file):
    entry = ModelConfig.objects.create(id="m", name="M", path=str(tiny_model_file))  # no facts yet
    form = ModelConfigForm(
        instance=entry,
        data={
            "id": "m",
            "name": "M",
            "path": "sub/nested.gguf",
            "cli_params": "{}",
            "metadata": "{}",
            "max_restarts": 3,
        },  # fmt: skip
    )
    assert form.is_valid(), form.errors
    form.save()
    assert_saved_with_facts(ModelConfig.objects.get(pk="m"), nested_model)


def test_api_create_and_change_take_a_relative_path(users, nested_model, tiny_model_file):
    client = APIClient()
    client.force_login(users["admin"])
    response = client.post(
        "/api/v1/models/", {"id": "nested", "name": "N", "path": "sub/nested.gguf"}, format="json"
    )
    assert response.status_code == 201, response.json()
    assert response.json()["file_size_bytes"] == nested_model.stat().st_size
    assert_saved_with_facts(ModelConfig.objects.get(pk="nested"), nested_model)
    response = client.patch("/api/v1/models/nested/", {"path": tiny_model_file.name}, format="json")
    assert response.status_code == 200, response.json()
    assert ModelConfig.objects.get(pk="nested").path == str(tiny_model_file.resolve())
    response = client.patch("/api/v1/models/nested/", {"path": "nope.gguf"}, format="json")
    assert response.status_code == 400 and "not found" in str(response.json()["path"])


def write_registry(folder: Path, entries: list[dict]) -> Path:
    path = folder / "models.yaml"
    path.write_text(yaml.safe_dump({"models": entries}))
    return path


@pytest.mark.django_db
def test_import_takes_a_path_relative_to_the_model_folders_too(tmp_path, nested_model):
    # The YAML file lies outside the model folders: "sub/nested.gguf" is found in the first one.
    call_command("import_models", str(write_registry(tmp_path, [{"id": "n", "path": "sub/nested.gguf"}])))
    assert_saved_with_facts(ModelConfig.objects.get(pk="n"), nested_model)


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"id": "long", "name": "x" * 201}, "entry 1 (long): name is 201 characters long, at most 200"),
        ({"id": "a" * 101}, f"entry 1 ({'a' * 101}): id is 101 characters long, at most 100"),
    ],
)
def test_import_refuses_values_longer_than_the_fields(tmp_path, tiny_model_file, entry, message):
    entry["path"] = str(tiny_model_file)
    with pytest.raises(CommandError) as caught:
        call_command("import_models", str(write_registry(tmp_path, [entry])))
    assert message in str(caught.value) and "nothing imported" in str(caught.value)
    assert not ModelConfig.objects.exists()
