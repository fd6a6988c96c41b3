"""The "Add a model" page (admins only): the GGUF files each host's worker reported (models_app/folder_scan.py)
listed per host with their facts and the predicted memory per GPU of that host, a down host's list marked stale,
Rescan sent to each live host's queue, and registration through the registry's rules, for the path of the host
that reported the file (issue 21)."""

import random
import shutil

import pytest
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from gpus.models import Gpu, Host
from models_app import folder_scan
from models_app.models import HostFolderScan, HostGgufFile, ModelConfig
from tests.models_app.test_folder_scan import gemma_like


@pytest.fixture
def second_file(tiny_model_file):
    """Another GGUF file in the model folder, not registered yet."""
    path = tiny_model_file.with_name("second-tiny.gguf")
    shutil.copy(tiny_model_file, path)
    yield path
    path.unlink(missing_ok=True)


@pytest.fixture
def scanned(live, sent):
    """testhost (the one host of `./lc.sh run`) has scanned the model folders, as its worker does at start."""
    folder_scan.scan_on_this_host(live.host)
    return live


@pytest.fixture
def box_b(db, settings, tmp_path, sent):
    """A second live host with one GPU whose worker found a gemma3 file in its own folder (not on the web node's
    disk: deleted after the scan), a folder that the web node's settings also allow by path."""
    folder = tmp_path / "box-b-models"
    folder.mkdir()
    path = gemma_like(folder / "gemma-b.gguf")
    host = Host.objects.create(name="box-b", last_seen=timezone.now())
    Gpu.objects.create(host=host, index=0, uuid="GPU-box-b-0", name="Box B GPU", memory_total_mib=48000,
                       memory_used_mib=1000)  # fmt: skip
    folder_scan.scan_on_this_host(host, [folder])
    path.unlink()
    settings.MODEL_DIRS = [*settings.MODEL_DIRS, folder]
    return host, path


def section(page: str, host: str) -> str:
    """One host's part of the page."""
    return page.split(f'data-host="{host}" data-up=')[1].split("</section>")[0]


def row_of(page: str, path, host: str | None = None) -> str:
    marker = f'data-path="{path}"' + (f' data-host="{host}"' if host else "")
    return page.split(marker)[1].split("</tr>")[0]


@pytest.mark.parametrize("who, status", [("viewer", 403), ("operator", 403), ("admin", 200)])
def test_only_admins_see_the_page(client, users, fake_gpus, sent, who, status):
    client.force_login(users[who])
    assert client.get("/models/add/").status_code == status
    assert client.post("/models/add/", {"rescan": "1"}).status_code == (302 if who == "admin" else 403)
    assert bool([s for s in sent if s[0] == "scan_model_folders"]) == (who == "admin")


def test_lists_files_with_facts_and_estimates(client, users, tiny_model, second_file, scanned):
    client.force_login(users["admin"])
    page = client.get("/models/add/").content.decode()
    row = row_of(page, second_file, "testhost")
    assert "second-tiny.gguf" in row and "llama" in row and "Register…" in row and "host=testhost" in row
    assert "MiB on GPU 0" in row and "MiB on GPU 1" in row  # the prediction on each GPU of the host
    assert "registered as tiny" in row_of(page, tiny_model.path)
    assert 'data-waiting="0"' in page and "hx-trigger" not in page.split('id="host-files"')[1].split(">")[0]


def test_two_hosts_with_different_lists_and_a_stale_one(client, users, tiny_model, scanned, box_b, sent):
    box_b_host, gemma = box_b
    client.force_login(users["admin"])
    page = client.get("/models/add/").content.decode()
    assert "gemma-b.gguf" not in section(page, "testhost") and "tiny.gguf" in section(page, "testhost")
    assert "tiny.gguf" not in section(page, "box-b") and "gemma-b.gguf" in section(page, "box-b")
    row = row_of(page, gemma, "box-b")
    assert "gemma3" in row and "MiB on GPU 0" in row and "GPU 1" not in row  # box-b's own GPU
    # box-b goes silent: its last-known list stays, marked stale, without estimates
    Host.objects.filter(pk=box_b_host.pk).update(last_seen=timezone.now() - timezone.timedelta(hours=1))
    page = client.get("/models/add/").content.decode()
    stale = section(page, "box-b")
    assert 'data-host="box-b" data-up="0"' in page and "stale" in stale and "last-known list" in stale
    assert "gemma-b.gguf" in stale and "host down" in stale and "MiB on GPU" not in stale


def test_register_from_host_b_uses_its_report(client, users, scanned, box_b):
    """The web node does not have box-b's file: the path, facts and size are the ones box-b's worker read."""
    host, gemma = box_b
    reported = HostGgufFile.objects.get(host=host, path=str(gemma))
    client.force_login(users["admin"])
    response = client.post(
        "/models/add/",
        {"id": "gemma-b", "name": "Gemma on B", "host": "box-b", "path": str(gemma), "cli_params": "{}"},
    )
    assert response.status_code == 302, response.content.decode()[-3000:]
    model = ModelConfig.objects.get(pk="gemma-b")
    assert model.path == str(gemma) and model.file_size_bytes == reported.size_bytes
    assert model.gguf_metadata == reported.facts and model.gguf_metadata["architecture"] == "gemma3"
    assert "registered as gemma-b" in row_of(client.get("/models/add/").content.decode(), gemma, "box-b")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"host": "box-z"}, "did not report a GGUF file"),  # an unknown host
        ({"host": "testhost"}, "did not report a GGUF file"),  # a file that another host reported
        ({"cli_params": '{"no-such-flag": 1}'}, "alert-error"),  # the catalogue's refusal, as everywhere
        ({"cli_params": "not json"}, "alert-error"),
        ({"id": ""}, "alert-error"),
    ],
)
def test_bad_registrations_are_4xx_and_write_nothing(client, users, scanned, box_b, change, message):
    host, gemma = box_b
    data = {"id": "g", "name": "G", "host": "box-b", "path": str(gemma), "cli_params": "{}", **change}
    client.force_login(users["admin"])
    response = client.post("/models/add/", data)
    assert response.status_code == 400 and message in response.content.decode()
    assert not ModelConfig.objects.exists()


def test_an_unreadable_file_is_listed_with_its_reason_and_cannot_be_registered(
    client, users, scanned, settings
):
    broken = settings.MODEL_DIRS[0] / "broken-download.gguf"
    broken.write_bytes(b"GGUF" + b"\xff" * 64)
    try:
        folder_scan.scan_on_this_host(scanned.host)
        client.force_login(users["admin"])
        row = row_of(client.get("/models/add/").content.decode(), broken)
        assert "unreadable" in row and "Register…" not in row
        response = client.post(
            "/models/add/",
            {"id": "b", "name": "B", "host": "testhost", "path": str(broken), "cli_params": "{}"},
        )
        assert response.status_code == 400 and "cannot be read on host testhost" in response.content.decode()
        assert not ModelConfig.objects.filter(pk="b").exists()
    finally:
        broken.unlink()


def test_rescan_asks_each_live_host_and_the_list_polls_until_it_lands(client, users, scanned, box_b, sent,
                                                                      second_file):  # fmt: skip
    Host.objects.create(name="box-down", last_seen=timezone.now() - timezone.timedelta(hours=1))
    client.force_login(users["admin"])
    sent.clear()
    assert client.post("/models/add/", {"rescan": "1"}).status_code == 302
    asked = sorted(
        (args[0], options["queue"]) for name, args, options in sent if name == "scan_model_folders"
    )
    assert asked == [("box-b", "host.box-b"), ("testhost", "host.testhost")]
    assert HostFolderScan.objects.get(host=scanned.host).pending
    listing = client.get("/models/add/?list=1").content.decode()
    assert (
        'data-waiting="1"' in listing and 'hx-trigger="every 1s"' in listing and "scanning again" in listing
    )
    assert "second-tiny.gguf" not in listing
    folder_scan.scan_on_this_host(scanned.host)  # testhost's worker answers
    folder_scan.scan_on_this_host(box_b[0], [])  # box-b's too: its folder is empty now
    listing = client.get("/models/add/?list=1").content.decode()
    assert 'data-waiting="0"' in listing and "hx-trigger" not in listing
    assert f'data-path="{second_file}"' in listing and "gemma-b.gguf" not in listing


def test_opening_the_page_asks_hosts_whose_list_is_old(client, users, scanned, sent):
    client.force_login(users["admin"])
    client.get("/models/add/")
    assert not [s for s in sent if s[0] == "scan_model_folders"]  # scanned a moment ago
    old = timezone.now() - timezone.timedelta(seconds=60)
    HostFolderScan.objects.filter(host=scanned.host).update(scanned_at=old)
    assert 'data-waiting="1"' in client.get("/models/add/").content.decode()
    client.get("/models/add/")  # asked a moment ago: not again
    assert [s[1] for s in sent if s[0] == "scan_model_folders"] == [["testhost"]]


def test_register_then_the_load_form_offers_it(client, users, scanned, second_file):
    folder_scan.scan_on_this_host(scanned.host)
    client.force_login(users["admin"])
    for host, pk in (("testhost", "second"), ("", "legacy")):  # without a host: read on the web node
        response = client.post(
            "/models/add/",
            {
                "id": pk,
                "name": f"Second tiny {pk}",
                "host": host,
                "path": str(second_file),
                "cli_params": "{}",
            },
        )
        assert response.status_code == 302 and response["Location"].endswith("/#load-heading")
        model = ModelConfig.objects.get(pk=pk)
        assert model.path == str(second_file) and model.gguf_metadata["architecture"] == "llama"
    assert (
        ModelConfig.objects.get(pk="second").gguf_metadata
        == ModelConfig.objects.get(pk="legacy").gguf_metadata
    )
    assert '<option value="second">Second tiny second (second)</option>' in client.get("/").content.decode()


def test_register_refuses_what_the_registry_refuses(client, users, live, tmp_path):
    outside = tmp_path / "elsewhere.gguf"
    outside.write_bytes(b"GGUF")
    client.force_login(users["admin"])
    response = client.post("/models/add/", {"id": "x", "name": "X", "path": str(outside), "cli_params": "{}"})
    assert response.status_code == 400 and not ModelConfig.objects.filter(pk="x").exists()
    assert "alert-error" in response.content.decode()


def test_corrupt_gguf_files_in_the_folder_leave_the_page_working(
    client, users, scanned, tiny_model, settings
):
    """Random bytes after the magic (a truncated download, a test's broken file): each one is listed as
    unreadable, never a 500 (seeded: the same 20 files every run)."""
    rng = random.Random(21)
    folder = settings.MODEL_DIRS[0] / "corrupt"
    folder.mkdir(exist_ok=True)
    paths = []
    for n in range(20):
        path = folder / f"corrupt-{n}.gguf"
        path.write_bytes(b"GGUF" + rng.randbytes(rng.choice([8, 64, 4096])))
        paths.append(path)
    try:
        folder_scan.scan_on_this_host(scanned.host)
        client.force_login(users["admin"])
        page = client.get("/models/add/")
        assert page.status_code == 200
        assert all("unreadable" in row_of(page.content.decode(), p) for p in paths)
    finally:
        shutil.rmtree(folder)


def test_the_page_queries_do_not_grow_with_the_files(client, users, scanned, settings, tiny_model_file):
    """The estimate per file and GPU reads the host's default llama-server once and, for a file not registered,
    no calibration: a fixed number of queries whether the host lists 1 file or 31."""
    client.force_login(users["admin"])

    def queries() -> int:
        folder_scan.scan_on_this_host(scanned.host)
        with CaptureQueriesContext(connection) as captured:
            assert client.get("/models/add/").status_code == 200
        return len(captured)

    queries()  # the process's first estimate reads the binary's catalogue once more (then kept, parsed)
    few = queries()
    folder = settings.MODEL_DIRS[0] / "many"
    folder.mkdir()
    try:
        for n in range(30):
            shutil.copy(tiny_model_file, folder / f"m{n:02}.gguf")
        assert queries() == few, few
    finally:
        shutil.rmtree(folder)
