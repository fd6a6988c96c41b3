"""A host's worker lists the GGUF files of its own model folders (models_app/folder_scan.py, issue 21): header facts
per file, unreadable files with the reason, links out of the folders not followed, vanished files removed, the
bounds, the estimator's summary of a header, and the task fan-out to each live host's queue."""

import os
import shutil
import time
from pathlib import Path

import pytest
from django.utils import timezone

from gpus.models import Host
from models_app import estimator, folder_scan, tasks
from models_app.models import HostFolderScan, HostGgufFile
from tests.gguf_helpers import write_small_gemma3

pytestmark = pytest.mark.django_db


def gemma_like(path: Path) -> Path:
    """A second architecture: a small gemma3 header (12 layers, a sliding window), its data a sparse hole."""
    return write_small_gemma3(path)


@pytest.fixture
def folders(tmp_path, tiny_model_file):
    """Two allowed folders: a tiny llama, a gemma3 in a subfolder, a corrupt file, a non-GGUF .gguf, a text
    file; and outside them a GGUF file reached by a link from inside (not to be followed)."""
    a, b, outside = tmp_path / "models-a", tmp_path / "models-b", tmp_path / "outside"
    for folder in (a, b / "family", outside):
        folder.mkdir(parents=True)
    shutil.copy(tiny_model_file, a / "tiny.gguf")
    gemma_like(b / "family" / "gemma.gguf")
    (a / "corrupt.gguf").write_bytes(b"GGUF" + bytes(range(256)) * 4)
    (a / "not-gguf.gguf").write_bytes(b"PK\x03\x04 a zip file, renamed")
    (a / "notes.txt").write_text("not a model")
    shutil.copy(tiny_model_file, outside / "secret.gguf")
    (a / "link-out.gguf").symlink_to(outside / "secret.gguf")
    (a / "dir-out").symlink_to(outside, target_is_directory=True)
    (b / "link-in.gguf").symlink_to(a / "tiny.gguf")
    return [a, b]


@pytest.fixture
def host(db):
    return Host.objects.create(name="box-a", last_seen=timezone.now())


def rows(host) -> dict[str, HostGgufFile]:
    return {Path(r.path).name: r for r in HostGgufFile.objects.filter(host=host)}


def test_scan_lists_headers_unreadable_files_and_not_links_out(folders, host):
    result = folder_scan.scan_on_this_host(host, folders)
    found = rows(host)
    assert set(found) == {"tiny.gguf", "gemma.gguf", "corrupt.gguf", "not-gguf.gguf", "link-in.gguf"}
    assert result["files"] == 5 and result["read"] == 5 and not result["limits"]
    tiny, gemma = found["tiny.gguf"], found["gemma.gguf"]
    assert (tiny.architecture, tiny.block_count, tiny.error) == ("llama", tiny.facts["block_count"], "")
    assert tiny.size_bytes == (folders[0] / "tiny.gguf").stat().st_size and tiny.quantization
    assert tiny.facts["architecture"] == "llama" and tiny.parameter_count == tiny.facts["parameter_count"]
    assert (gemma.architecture, gemma.block_count, gemma.context_length) == ("gemma3", 12, 32768)
    assert gemma.path == str(folders[1] / "family" / "gemma.gguf")
    assert found["corrupt.gguf"].error and not found["corrupt.gguf"].architecture
    assert found["not-gguf.gguf"].error == "not a GGUF file"
    # a link inside the folders is listed under its own path; links out of them (file or folder) are not
    assert found["link-in.gguf"].architecture == "llama"
    assert not HostGgufFile.objects.filter(path__contains="secret").exists()
    scan = HostFolderScan.objects.get(host=host)
    assert scan.folders == [str(f) for f in folders] and scan.files == 5 and scan.scanned_at and not scan.note


def test_names_the_registry_cannot_hold_are_skipped(folders, host, monkeypatch):
    with open(os.path.join(os.fsencode(folders[0]), b"latin-\xe9.gguf"), "wb") as handle:
        handle.write(b"GGUF")  # a name in Latin-1, not UTF-8
    monkeypatch.setattr(folder_scan, "MAX_PATH", len(str(folders[0] / "tiny.gguf")))
    folder_scan.scan_on_this_host(host, folders)
    assert "tiny.gguf" in rows(host) and "corrupt.gguf" not in rows(host)  # one character too long
    assert not [name for name in rows(host) if name.startswith("latin")]


def test_the_header_summary_gives_the_same_estimate_as_the_file(folders, host):
    folder_scan.scan_on_this_host(host, folders)
    for name in ("tiny.gguf", "gemma.gguf"):
        row = rows(host)[name]
        stored = estimator.from_summary(row.path, row.header)
        direct = estimator.read_header(row.path)
        for options in ({}, {"ctx-size": 1024}, {"ctx-size": 2048, "gpu-layers": 3}):
            for gpus in (1, 2):
                assert (
                    estimator.estimate(stored, options, gpus=gpus).as_dict()
                    == estimator.estimate(direct, options, gpus=gpus).as_dict()
                )
        assert len(str(row.header)) < len(str(direct.tensors)) + len(str(direct.metadata))


def test_unchanged_files_are_not_read_again_and_vanished_ones_go(folders, host, monkeypatch):
    folder_scan.scan_on_this_host(host, folders)
    read = []
    original = folder_scan.read_file
    monkeypatch.setattr(
        folder_scan, "read_file", lambda path, stat: read.append(path) or original(path, stat)
    )
    again = folder_scan.scan_on_this_host(host, folders)
    assert read == [] and again["read"] == 0 and again["files"] == 5
    (folders[1] / "family" / "gemma.gguf").unlink()
    tiny = folders[0] / "tiny.gguf"
    os.utime(tiny, (time.time() + 5, time.time() + 5))  # touched: read again, and the link to it
    third = folder_scan.scan_on_this_host(host, folders)
    assert sorted(read) == [str(tiny), str(folders[1] / "link-in.gguf")] and third["removed"] == 1
    assert "gemma.gguf" not in rows(host) and len(rows(host)) == 4


def test_each_host_keeps_its_own_list(folders, host):
    other = Host.objects.create(name="box-b", last_seen=timezone.now())
    folder_scan.scan_on_this_host(host, folders[:1])
    folder_scan.scan_on_this_host(other, folders[1:])
    assert set(rows(host)) == {"tiny.gguf", "corrupt.gguf", "not-gguf.gguf"}
    # box-b allows models-b only: its link into models-a points out of its folders
    assert set(rows(other)) == {"gemma.gguf"}
    folder_scan.scan_on_this_host(other, [])
    assert rows(other) == {} and len(rows(host)) == 3


def test_the_bounds_cut_a_huge_folder_short(tmp_path, tiny_model_file, host, monkeypatch):
    """Entries, files, depth and time are bounded; what was cut is said, and rows of files still there stay."""
    folder = tmp_path / "many"
    (folder / "deep" / "a" / "b").mkdir(parents=True)
    for n in range(30):
        shutil.copy(tiny_model_file, folder / f"m{n:02}.gguf")
    for n in range(200):
        (folder / f"junk{n:03}.bin").touch()
    shutil.copy(tiny_model_file, folder / "deep" / "a" / "b" / "deep.gguf")
    monkeypatch.setattr(folder_scan, "MAX_FILES", 10)
    result = folder_scan.scan_on_this_host(host, [folder])
    assert result["files"] == 10 and "only the first 10 .gguf files are listed" in result["limits"]
    monkeypatch.setattr(folder_scan, "MAX_FILES", 1000)
    monkeypatch.setattr(folder_scan, "MAX_ENTRIES", 50)
    result = folder_scan.scan_on_this_host(host, [folder])
    assert "stopped after 50 folder entries" in result["limits"] and result["entries"] == 51
    assert HostGgufFile.objects.filter(host=host).count() >= 10  # cut short: the rows of existing files stay
    assert "stopped after 50 folder entries" in HostFolderScan.objects.get(host=host).note
    monkeypatch.setattr(folder_scan, "MAX_ENTRIES", 100_000)
    monkeypatch.setattr(folder_scan, "MAX_DEPTH", 1)
    result = folder_scan.scan_on_this_host(host, [folder])
    assert "folders deeper than 1 levels are not scanned" in result["limits"]
    assert not HostGgufFile.objects.filter(path__endswith="deep.gguf").exists()
    monkeypatch.setattr(folder_scan, "MAX_DEPTH", 6)
    assert folder_scan.scan_on_this_host(host, [folder])["files"] == 31
    monkeypatch.setattr(folder_scan, "MAX_SECONDS", 0.0)  # the deadline passed at once: nothing hangs
    result = folder_scan.scan_on_this_host(host, [folder])
    assert result["limits"] == ["stopped after 0 s"]


def test_a_folder_of_100000_entries_is_bounded(tmp_path, host):
    folder = tmp_path / "huge"
    folder.mkdir()
    for n in range(100_000):  # every 50th an empty .gguf: an unreadable header to read, the slow case
        (folder / (f"f{n:06}.gguf" if n % 50 == 0 else f"f{n:06}.part")).touch()
    started = time.monotonic()
    result = folder_scan.scan_on_this_host(host, [folder])
    elapsed = time.monotonic() - started
    assert result["limits"] == [f"stopped after {folder_scan.MAX_ENTRIES} folder entries"]
    assert result["entries"] == folder_scan.MAX_ENTRIES + 1 and 0 < result["files"] <= folder_scan.MAX_FILES
    assert elapsed < folder_scan.MAX_SECONDS + 10, elapsed
    print(f"100 000 entries: {result['files']} listed in {elapsed:.2f} s; {result['limits']}")


def test_the_beat_fans_out_one_scan_per_live_host(sent, host):
    Host.objects.create(name="box-down", last_seen=timezone.now() - timezone.timedelta(hours=1))
    Host.objects.create(name="box-b", last_seen=timezone.now())
    assert tasks.dispatch_folder_scans() == 2
    scans = [(name, args, options["queue"]) for name, args, options in sent if name == "scan_model_folders"]
    assert sorted(scans) == [
        ("scan_model_folders", ["box-a"], "host.box-a"),
        ("scan_model_folders", ["box-b"], "host.box-b"),
    ]
    assert all(0 < options["expires"] < 60 for name, _, options in sent if name == "scan_model_folders")


def test_the_task_scans_this_hosts_folders(settings, folders, host):
    settings.MODEL_DIRS = folders
    assert tasks.scan_model_folders("box-a")["files"] == 5
    assert tasks.scan_model_folders("no-such-host") == {}
