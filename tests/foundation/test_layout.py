"""Dependencies point one way (README "Layout"): accounts imports no other app of ours, gpus never imports
models_app, gpus/telemetry imports no Django, no app imports the site package, and utilities (shared by every
app) imports none of ours."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(package: str) -> dict[str, set[str]]:
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        if "migrations" in path.parts:
            continue
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        found[str(path.relative_to(ROOT))] = names
    return found


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("accounts", ("models_app", "gpus", "llamacontroller_site")),
        ("gpus", ("models_app", "llamacontroller_site")),
        ("gpus/telemetry", ("django", "models_app", "accounts")),
        ("models_app", ("llamacontroller_site",)),
        ("gateway", ("llamacontroller_site",)),
        ("utilities", ("accounts", "gpus", "models_app", "gateway", "llamacontroller_site")),
    ],
)
def test_dependencies_point_one_way(package, forbidden):
    wrong = [
        f"{path} imports {name}"
        for path, names in imported_modules(package).items()
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
    ]
    assert not wrong, wrong
