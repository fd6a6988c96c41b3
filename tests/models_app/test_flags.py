"""llama-server's flags as the binary defines them: the --help parser (captured text and the real binary),
name resolution, the allowlist, input files inside the model folders, and refusal at every entry point
(YAML import, admin, API) with nothing written."""

import os
from pathlib import Path

import pytest
import yaml
from django.core.management import CommandError, call_command
from rest_framework.test import APIClient

from models_app import flags, registry
from models_app.flags import Catalogue
from models_app.models import LlamaBinary, ModelConfig
from models_app.registry import RegistryError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "llama-server"
HELP = (FIXTURES / "help.txt").read_text()


@pytest.fixture(scope="module")
def catalogue() -> Catalogue:
    return Catalogue({"version": "b6100", "options": flags.parse_help(HELP)})


def option(catalogue, spelling):
    return catalogue.by_spelling[spelling]


# --- the parser ----------------------------------------------------------------------------------------


def test_parser_reads_every_option_of_the_captured_help(catalogue):
    heads = [line for line in HELP.splitlines() if line.startswith("-") and not line.startswith("-----")]
    firsts = {o["names"][0] for o in catalogue.options}
    for head in heads:
        assert flags.SPELLING.match(head).group(0) in firsts, head
    assert len(catalogue.options) > 200
    ngl = option(catalogue, "--n-gpu-layers")
    assert ngl["names"] == ["-ngl", "--gpu-layers", "--n-gpu-layers"]
    assert (ngl["metavar"], ngl["nargs"], ngl["file"], ngl["env"]) == (
        "N",
        1,
        False,
        "LLAMA_ARG_N_GPU_LAYERS",
    )
    assert option(catalogue, "-fa")["names"] == ["-fa", "--flash-attn"]
    assert option(catalogue, "-fa")["nargs"] == 1  # `[on|off|auto]` is a required value
    kvo = option(catalogue, "--no-kv-offload")
    assert kvo["names"] == ["-kvo", "--kv-offload", "-nkvo", "--no-kv-offload"] and kvo["nargs"] == 0
    assert option(catalogue, "--control-vector-layer-range")["nargs"] == 2
    assert option(catalogue, "-ot")["nargs"] == 1  # `<tensor name pattern>=<buffer type>,...`
    assert option(catalogue, "--fim-qwen-1.5b-default")["nargs"] == 0
    for spelling in ("--lora", "--lora-scaled", "-md", "--mmproj", "--control-vector", "--grammar-file",
                     "--json-schema-file", "--chat-template-file", "--ui-config-file", "--slot-save-path"):  # fmt: skip
        assert option(catalogue, spelling)["file"], spelling
    for spelling in ("-c", "--chat-template", "--json-schema", "--host", "-ngl", "--alias"):
        assert not option(catalogue, spelling)["file"], spelling
    assert option(catalogue, "--media-path")["directory"]
    assert option(catalogue, "--video-ffmpeg-dir")["directory"]


def test_parser_older_layout_and_version_words():
    text = (
        "-m,    --model FNAME                    model path (default: `models/7B/ggml-model-f16.gguf`)\n"
        "--mmap, --no-mmap                       whether to memory-map model\n"
        "--port PORT                             port to listen (default: 8080)\n"
        "--draft-file-cache FILE_PATH            a file\n"
        "--control-vector-layer-range START END\n"
        "                                        layer range\n"
    )
    options = {o["names"][0]: o for o in flags.parse_help(text)}
    assert options["--mmap"]["names"] == ["--mmap", "--no-mmap"] and options["--mmap"]["nargs"] == 0
    assert options["-m"]["file"] and options["--draft-file-cache"]["file"]
    assert options["--control-vector-layer-range"]["help"] == "layer range"
    assert flags.parse_version("version: 6123 (abc1234)\nbuilt with cc") == "b6123"
    assert flags.parse_version("version: 0.6.0-dev (build 0, commit unknown)") == "0.6.0-dev"
    with pytest.raises(flags.CatalogueError):
        flags.parse_version("GNU bash, version 5.2.15(1)-release")


def test_parser_against_the_real_binary(llama_server_path):
    data = flags.read_catalogue(llama_server_path)
    real = Catalogue(data)
    assert data["version"] and "version:" in data["version_text"]
    assert real.resolve("ngl").spelling == "-ngl"
    assert real.resolve("c").option["nargs"] == 1
    assert real.resolve("lora").option["file"]
    # The captured fixture is the same build's help: refresh it when the build changes.
    assert len(real.options) >= 100


# --- resolution and values -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "spelling"),
    [("ngl", "-ngl"), ("c", "-c"), ("n-gpu-layers", "--n-gpu-layers"), ("fa", "-fa"), ("flash-attn", "--flash-attn"),
     ("ctk", "-ctk"), ("ts", "-ts"), ("np", "-np"), ("ub", "-ub"), ("no-warmup", "--no-warmup")],
)  # fmt: skip
def test_names_resolve_to_the_binarys_spelling(catalogue, name, spelling):
    assert catalogue.resolve(name).spelling == spelling


def test_readme_example_builds_the_arguments_llama_server_accepts(catalogue):
    assert registry.cli_args({"c": 2048, "ngl": 99}, catalogue) == ["-c", "2048", "-ngl", "99"]
    assert registry.cli_args({"fa": "on", "no-warmup": None, "kvo": False}, catalogue) == [
        "-fa",
        "on",
        "--no-warmup",
    ]
    assert registry.cli_args({"ot": ["a=CPU", "b=CPU"]}, catalogue) == ["-ot", "a=CPU", "-ot", "b=CPU"]


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"ngll": 99}, "llama-server b6100 has no flag 'ngll' (did you mean 'ngl'?)"),
        ({"ctx-sise": 1}, "did you mean 'ctx-size'?"),
        ({"c": None}, "flag 'c' needs a value (N), got null"),
        ({"fa": True}, "quote on/off/yes/no in YAML"),
        ({"no-warmup": 1}, "flag 'no-warmup' takes no value"),
        ({"no-warmup": [None, None]}, "cannot be repeated"),
        ({"control-vector-layer-range": 3}, "needs 2 values"),
    ],
)
def test_unknown_names_and_value_mismatches_are_refused(catalogue, params, message):
    with pytest.raises(RegistryError) as caught:
        registry.cli_args(params, catalogue)
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("name", "value", "why"),
    [
        ("m", "/x.gguf", "set by the controller"),
        ("model", "/x.gguf", "set by the controller"),
        ("host", "0.0.0.0", "set by the controller"),
        ("port", 1, "set by the controller"),
        ("api-key", "k", "set by the controller"),
        ("api-key-file", "/k", "set by the controller"),
        ("log-file", "/etc/cron.d/x", "set by the controller"),
        ("path", "/", "set by the controller"),
        ("alias", "x", "set by the controller"),
        ("a", "x", "set by the controller"),
        ("ssl-key-file", "/k", "set by the controller"),
        ("ssl-cert-file", "/c", "set by the controller"),
        ("hf", "a/b", "network"),
        ("hfr", "a/b", "network"),
        ("hf-repo", "a/b", "network"),
        ("hff", "f", "network"),
        ("hf-token", "t", "network"),
        ("hfd", "a/b", "network"),
        ("mu", "http://x", "network"),
        ("model-url", "http://x", "network"),
        ("mmproj-url", "http://x", "network"),
        ("docker-repo", "gemma3", "network"),
        ("dr", "gemma3", "network"),
        ("offline", None, "network"),
        ("rpc", "10.0.0.1:50052", "network"),
        ("gpt-oss-20b-default", None, "network"),
        ("tools", "all", "run programs"),
        ("mcp-servers-config", "/x.json", "run programs"),
        ("video-ffmpeg-dir", "/tmp", "run programs"),
        ("models-preset", "/x.ini", "run programs"),
        ("slot-save-path", "/tmp", "writes files"),
        ("lcd", "/tmp/c", "writes files"),
        ("log-prompts-dir", "/tmp", "writes files"),
        ("help", None, "prints and exits"),
        ("list-devices", None, "prints and exits"),
    ],
)
def test_owned_network_tool_and_writing_flags_are_refused(catalogue, name, value, why):
    with pytest.raises(RegistryError) as caught:
        registry.cli_args({name: value}, catalogue)
    assert why in str(caught.value)


# --- input files ---------------------------------------------------------------------------------------


@pytest.fixture
def model_folder(settings, tmp_path):
    folder = tmp_path / "models"
    folder.mkdir()
    settings.MODEL_DIRS = [folder.resolve()]
    for name in ("model.gguf", "lora-a.gguf", "lora-b.gguf", "draft.gguf", "mmproj.gguf", "grammar.gbnf"):
        (folder / name).write_bytes(b"GGUF0000")
    (folder / "media").mkdir()
    return folder.resolve()


@pytest.mark.parametrize(
    "name", ["lora", "model-draft", "md", "mmproj", "mm", "control-vector", "grammar-file", "jf",
             "chat-template-file", "lookup-cache-static"],
)  # fmt: skip
def test_input_files_must_be_inside_the_model_folders(catalogue, model_folder, tmp_path, name):
    outside = tmp_path / "outside.gguf"
    outside.write_bytes(b"GGUF")
    link = model_folder / "sneaky.gguf"
    link.symlink_to("/etc/passwd")
    for value in ("/etc/passwd", str(outside), "../outside.gguf", "sneaky.gguf"):
        with pytest.raises(RegistryError, match="outside the allowed model folders"):
            registry.cli_args({name: value}, catalogue, model_folder / "model.gguf")
    with pytest.raises(RegistryError, match="not found"):
        registry.cli_args({name: "missing.gguf"}, catalogue, model_folder / "model.gguf")
    args = registry.cli_args({name: "draft.gguf"}, catalogue, model_folder / "model.gguf")
    assert args[1] == str(model_folder / "draft.gguf")  # relative to the model's folder, made absolute


def test_file_lists_scales_and_folders(catalogue, model_folder):
    model = model_folder / "model.gguf"
    assert registry.cli_args({"lora": "lora-a.gguf,lora-b.gguf"}, catalogue, model) == [
        "--lora", f"{model_folder}/lora-a.gguf,{model_folder}/lora-b.gguf",
    ]  # fmt: skip
    assert registry.cli_args({"lora-scaled": "lora-a.gguf:0.5"}, catalogue, model) == [
        "--lora-scaled", f"{model_folder}/lora-a.gguf:0.5",
    ]  # fmt: skip
    with pytest.raises(RegistryError, match="outside"):
        registry.cli_args({"lora-scaled": "lora-a.gguf:0.5,/etc/passwd:1"}, catalogue, model)
    assert registry.cli_args({"media-path": "media"}, catalogue, model) == [
        "--media-path",
        f"{model_folder}/media",
    ]
    with pytest.raises(RegistryError, match="outside"):
        registry.cli_args({"media-path": "/"}, catalogue, model)


# --- entry points: YAML import, admin, API -------------------------------------------------------------


def write_registry(tmp_path, model_path, cli_params) -> Path:
    path = tmp_path / "models.yaml"
    entry = {
        "id": "flagged",
        "name": "Flagged",
        "path": str(model_path),
        "parameters": {"cli_params": cli_params},
    }
    path.write_text(yaml.safe_dump({"models": [entry]}))
    return path


@pytest.mark.django_db
def test_yaml_import_refuses_unknown_flags_and_writes_nothing(tmp_path, tiny_model_file, llama_server_path):
    for params, message in [
        ({"ngll": 99}, "has no flag 'ngll' (did you mean 'ngl'?)"),
        ({"c": None}, "flag 'c' needs a value"),
        ({"path": "/"}, "set by the controller"),
        ({"lora": "/etc/passwd"}, "outside the allowed model folders"),
    ]:
        with pytest.raises(CommandError) as caught:
            call_command("import_models", str(write_registry(tmp_path, tiny_model_file, params)))
        assert message in str(caught.value)
        assert not ModelConfig.objects.exists()
    call_command("import_models", str(write_registry(tmp_path, tiny_model_file, {"c": 2048, "ngl": 99})))
    assert ModelConfig.objects.get(pk="flagged").cli_params == {"c": 2048, "ngl": 99}


@pytest.mark.parametrize(
    "value", ["nan,1", "inf,1", "1,1e999", "-inf", "１,1", "3,a", float("nan"), float("inf")]
)
def test_a_tensor_split_must_be_finite_numbers(catalogue, value):
    # NaN reached the estimator (500) and the CLI's JSON (`[NaN, 1.0]`, not JSON) before.
    with pytest.raises(RegistryError, match="finite number"):
        registry.cli_args({"ts": value}, catalogue)
    assert registry.cli_args({"ts": "3,1"}, catalogue) == ["-ts", "3,1"]
    assert registry.cli_args({"tensor-split": "0.5/0.5"}, catalogue) == ["--tensor-split", "0.5/0.5"]


def test_no_flag_takes_a_float_that_is_not_finite(catalogue):
    with pytest.raises(RegistryError, match="not a finite number"):
        registry.cli_args({"temp": float("inf")}, catalogue)
    assert registry.cli_args({"temp": 0.7}, catalogue) == ["--temp", "0.7"]


@pytest.mark.django_db
def test_yaml_import_refuses_a_tensor_split_that_is_not_finite(tmp_path, tiny_model_file, llama_server_path):
    with pytest.raises(CommandError, match="flag 'ts' needs finite numbers") as caught:
        call_command("import_models", str(write_registry(tmp_path, tiny_model_file, {"ts": "nan,1"})))
    assert "entry 1 (flagged)" in str(caught.value)
    assert not ModelConfig.objects.exists()


@pytest.mark.django_db
def test_yaml_on_without_quotes_is_explained(tmp_path, tiny_model_file, llama_server_path):
    path = tmp_path / "models.yaml"
    path.write_text(
        f"models:\n  - id: x\n    path: {tiny_model_file}\n    parameters:\n      cli_params: {{fa: on}}\n"
    )
    with pytest.raises(CommandError, match="quote on/off"):
        call_command("import_models", str(path))


def test_api_refuses_unknown_flags_with_400_and_writes_nothing(users, tiny_model, llama_server_path):
    client = APIClient()
    client.force_login(users["admin"])
    body = {"id": "x", "name": "X", "path": tiny_model.path, "cli_params": {"ngll": 99}}
    response = client.post("/api/v1/models/", body, format="json")
    assert response.status_code == 400
    assert "has no flag 'ngll' (did you mean 'ngl'?)" in str(response.json()["cli_params"])
    assert not ModelConfig.objects.filter(pk="x").exists()
    response = client.patch("/api/v1/models/tiny/", {"cli_params": {"lora": "/etc/passwd"}}, format="json")
    assert response.status_code == 400 and "outside" in str(response.json()["cli_params"])
    response = client.patch("/api/v1/models/tiny/", {"cli_params": {"c": 2048, "ngl": 99}}, format="json")
    assert response.status_code == 200, response.json()
    tiny_model.refresh_from_db()
    assert tiny_model.cli_params == {"c": 2048, "ngl": 99}


def test_admin_refuses_unknown_flags_and_writes_nothing(users, tiny_model, llama_server_path, client):
    client.force_login(users["admin"])
    form = {"id": "y", "name": "Y", "path": tiny_model.path, "cli_params": '{"ngll": 99}', "metadata": "{}",
            "max_restarts": 3}  # fmt: skip
    response = client.post("/admin/models_app/modelconfig/add/", form)
    assert response.status_code == 200
    assert "has no flag &#x27;ngll&#x27; (did you mean &#x27;ngl&#x27;?)" in response.content.decode()
    assert not ModelConfig.objects.filter(pk="y").exists()
    form["cli_params"] = '{"c": 2048, "ngl": 99}'
    response = client.post("/admin/models_app/modelconfig/add/", form)
    assert response.status_code == 302
    assert ModelConfig.objects.get(pk="y").cli_params == {"c": 2048, "ngl": 99}


def test_admin_offers_no_way_to_type_a_binary_path(users, fake_gpus, client):
    client.force_login(users["admin"])
    assert client.get("/admin/models_app/llamabinary/add/").status_code == 403
    row = LlamaBinary.objects.create(host=fake_gpus.host, name="x", path="/bin/sh", error="not llama.cpp")
    response = client.post(f"/admin/models_app/llamabinary/{row.pk}/change/", {"path": "/bin/bash"})
    assert response.status_code == 403
    row.refresh_from_db()
    assert row.path == "/bin/sh"
    # A model chooses among verified rows only.
    response = client.get("/admin/models_app/modelconfig/add/")
    assert f'value="{row.pk}"' not in response.content.decode()


def test_environment_variables_do_not_reach_flag_parsing(monkeypatch, llama_server_path):
    # LLAMA_ARG_* in the worker's environment would set flags behind the registry's back.
    monkeypatch.setenv("LLAMA_ARG_MODEL_URL", "http://example.invalid/x.gguf")
    from models_app.processes import scrubbed_env

    assert "LLAMA_ARG_MODEL_URL" not in scrubbed_env()
    assert os.environ["LLAMA_ARG_MODEL_URL"]


def test_the_readme_example_passes_the_real_binarys_catalogue(llama_server_path):
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    line = next(line for line in readme.splitlines() if line.strip().startswith("cli_params:"))
    params = yaml.safe_load(line.split("#")[0].strip())["cli_params"]
    assert params == {"c": 2048, "ngl": 99}
    real = Catalogue(flags.read_catalogue(llama_server_path))
    assert registry.cli_args(params, real) == ["-c", "2048", "-ngl", "99"]
