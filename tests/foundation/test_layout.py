"""Dependencies point one way (README "Layout"): accounts imports no other app of ours, gpus never imports
models_app, gpus/telemetry imports no Django, the estimator (models_app/estimator) imports neither Django nor the
rest of models_app, no app imports the site package, and utilities (shared by every app) imports none of ours."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def imported_modules(package: str) -> dict[str, set[str]]:
    """The modules each file under `package` imports, relative imports spelled out (`from ..registry import x`
    in models_app/estimator/sizes.py is models_app.registry)."""
    found: dict[str, set[str]] = {}
    for path in (ROOT / package).rglob("*.py"):
        if "migrations" in path.parts:
            continue
        here = list(path.relative_to(ROOT).parent.parts)  # the file's own package
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                names.add(node.module)
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1])
                if node.module:
                    names.add(f"{base}.{node.module}")
                else:  # `from .. import tasks` imports the module models_app.tasks
                    names.update(f"{base}.{alias.name}" for alias in node.names)
        found[str(path.relative_to(ROOT))] = names
    assert found, f"no modules under {package}"
    return found


@pytest.mark.parametrize(
    "package, forbidden",
    [
        ("accounts", ("models_app", "gpus", "llamacontroller_site")),
        ("gpus", ("models_app", "llamacontroller_site")),
        ("gpus/telemetry", ("django", "models_app", "accounts")),
        ("models_app/estimator", ("django", "models_app", "accounts", "gpus", "gateway")),
        ("models_app", ("llamacontroller_site",)),
        ("gateway", ("llamacontroller_site",)),
        ("utilities", ("accounts", "gpus", "models_app", "gateway", "llamacontroller_site")),
    ],
)
def test_dependencies_point_one_way(package, forbidden):
    own = package.replace("/", ".")  # a package may import its own modules
    wrong = [
        f"{path} imports {name}"
        for path, names in imported_modules(package).items()
        for name in names
        if any(name == f or name.startswith(f + ".") for f in forbidden)
        and not (name == own or name.startswith(own + "."))
    ]
    assert not wrong, wrong
