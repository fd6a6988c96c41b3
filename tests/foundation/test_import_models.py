"""`manage.py import_models FILE.yaml`: the original LlamaController's registry format."""

from pathlib import Path

import pytest
import yaml
from django.conf import settings
from django.core.management import CommandError, call_command

from models_app.models import InstanceEvent, ModelConfig
from models_app.testmodel import write_tiny_model


@pytest.fixture
def model_dir():
    folder = Path(settings.MODEL_DIRS[0])
    write_tiny_model(folder / "a.gguf")
    write_tiny_model(folder / "b.gguf", seed=1)
    # LoRA files named by model-a's flags: input files must exist inside the model folders.
    write_tiny_model(folder / "x.gguf", seed=2)
    write_tiny_model(folder / "y.gguf", seed=3)
    return folder


def write_yaml(tmp_path, models) -> Path:
    path = tmp_path / "models.yaml"
    path.write_text(yaml.safe_dump({"models": models}))
    return path


def run(path, *args) -> str:
    from io import StringIO

    out = StringIO()
    call_command("import_models", str(path), *args, stdout=out)
    return out.getvalue()


GOOD = [
    {
        "id": "model-a",
        "name": "Model A",
        "path": None,
        "parameters": {"cli_params": {"c": 4096, "ngl": 99, "no-warmup": None, "lora": ["x.gguf", "y.gguf"]}},
        "metadata": {"family": "llama"},
    },
    {"id": "model-b", "name": "Model B", "path": None},
]


def good_models(model_dir):
    models = [dict(m) for m in GOOD]
    models[0]["path"] = str(model_dir / "a.gguf")
    models[1]["path"] = str(model_dir / "b.gguf")
    return models


@pytest.mark.django_db
def test_good_file_creates_then_updates_then_reports_unchanged(tmp_path, model_dir):
    path = write_yaml(tmp_path, good_models(model_dir))
    out = run(path)
    assert "2 created, 0 updated, 0 unchanged" in out
    a = ModelConfig.objects.get(id="model-a")
    assert a.cli_params["lora"] == ["x.gguf", "y.gguf"] and a.cli_params["no-warmup"] is None
    assert a.gguf_metadata["architecture"] == "llama" and a.gguf_metadata["block_count"] == 2
    assert InstanceEvent.objects.filter(kind="registry_changed").count() == 1

    models = good_models(model_dir)
    models[1]["name"] = "Model B renamed"
    out = run(write_yaml(tmp_path, models))
    assert "updated  model-b: name" in out and "0 created, 1 updated, 1 unchanged" in out
    assert ModelConfig.objects.get(id="model-b").name == "Model B renamed"


@pytest.mark.django_db
def test_relative_paths_are_relative_to_the_file(model_dir):
    path = write_yaml(model_dir, [{"id": "rel", "name": "Rel", "path": "a.gguf"}])
    run(path)
    assert ModelConfig.objects.get(id="rel").path == str((model_dir / "a.gguf").resolve())


def bad_cases(model_dir, tmp_path):
    outside = write_tiny_model(tmp_path / "outside" / "c.gguf")
    not_gguf = model_dir / "notes.txt"
    not_gguf.write_text("hello")
    fake_gguf = model_dir / "fake.gguf"
    fake_gguf.write_text("not really gguf")
    return {
        "missing file": ({"id": "x", "path": str(model_dir / "nope.gguf")}, "file not found"),
        "not gguf": ({"id": "x", "path": str(not_gguf)}, "not a .gguf file"),
        "bad magic": ({"id": "x", "path": str(fake_gguf)}, "not a GGUF file"),
        "outside folders": ({"id": "x", "path": str(outside)}, "outside the allowed model folders"),
        "bad flag": (
            {"id": "x", "path": str(model_dir / "a.gguf"), "parameters": {"cli_params": {"--evil": 1}}},
            "bad flag name '--evil'",
        ),
        "reserved flag": (
            {"id": "x", "path": str(model_dir / "a.gguf"), "parameters": {"cli_params": {"port": 1}}},
            "set by the controller",
        ),
        "flag with shell": (
            {"id": "x", "path": str(model_dir / "a.gguf"), "parameters": {"cli_params": {"c; rm -rf /": 1}}},
            "bad flag name",
        ),
        "duplicate id": ({"id": "model-a", "path": str(model_dir / "b.gguf")}, "(model-a): duplicate id"),
        "missing id": ({"path": str(model_dir / "b.gguf")}, "missing id"),
        "bad id": ({"id": "has space", "path": str(model_dir / "b.gguf")}, "id must be a slug"),
    }


@pytest.mark.django_db
@pytest.mark.parametrize(
    "case",
    [
        "missing file", "not gguf", "bad magic", "outside folders", "bad flag", "reserved flag",
        "flag with shell", "duplicate id", "missing id", "bad id",
    ],
)  # fmt: skip
def test_bad_entry_rejects_the_whole_file(tmp_path, model_dir, case):
    entry, message = bad_cases(model_dir, tmp_path)[case]
    models = good_models(model_dir) + [entry]
    with pytest.raises(CommandError) as error:
        run(write_yaml(tmp_path, models))
    assert "nothing imported" in str(error.value)
    assert message in str(error.value)
    assert "entry 3" in str(error.value)
    assert ModelConfig.objects.count() == 0


@pytest.mark.django_db
def test_not_a_registry_file(tmp_path):
    path = tmp_path / "models.yaml"
    path.write_text("just: text\n")
    with pytest.raises(CommandError, match="expected a top-level 'models:' list"):
        run(path)
    path.write_text("models: [\n")
    with pytest.raises(CommandError, match="not valid YAML"):
        run(path)


def test_make_test_model_writes_a_readable_gguf(tmp_path):
    from models_app.registry import read_gguf_facts

    out = tmp_path / "t.gguf"
    call_command("make_test_model", str(out))
    facts = read_gguf_facts(out)
    assert facts["architecture"] == "llama"
    assert facts["block_count"] == 2 and facts["embedding_length"] == 64
    assert 300_000 < out.stat().st_size < 1_000_000
