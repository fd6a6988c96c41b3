"""bench/gateway_floor.py measures the gateway beside copies of it with parts taken out by the patches in
bench/floor: they must still apply to the code as it is, or the benchmark stops before it measures."""

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PATCHES = sorted((ROOT / "bench" / "floor").glob("*.diff"))


@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
@pytest.mark.parametrize("patch", PATCHES, ids=[p.name for p in PATCHES])
def test_the_floor_patches_apply_to_the_code_as_it_is(patch):
    checked = subprocess.run(
        ["git", "apply", "--check", str(patch)], cwd=ROOT, capture_output=True, text=True
    )
    assert checked.returncode == 0, (
        f"{patch.name} no longer applies (make the change again in a copy and write its `git diff` there): "
        f"{checked.stderr}"
    )


def test_there_are_floor_patches():
    assert {p.name for p in PATCHES} == {"no-statements.diff", "no-django-handler.diff", "long-caches.diff"}
