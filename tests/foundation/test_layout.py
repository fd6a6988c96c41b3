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
        # policy builds on models_app and gpus; models_app may call its rules (policy.quotas, .reservations,
        # .pins) from admission, never its API, admin or tasks; the lower apps never import it.
        ("policy", ("llamacontroller_site", "gateway")),
        ("models_app", ("policy.api", "policy.admin", "policy.tasks")),
        ("gpus", ("policy",)),
        ("accounts", ("policy",)),
        ("utilities", ("policy",)),
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


# --- queuing work: one module per app, by name, and nothing imports a tasks.py -------------------------

PRODUCT = ("accounts", "gateway", "gpus", "llamacontroller_site", "models_app", "policy", "utilities")
DISPATCH = {"utilities/dispatch.py", "models_app/dispatch.py", "gpus/dispatch.py"}


def product_files():
    for package in PRODUCT:
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" not in path.parts:
                yield path


def test_product_packages_exist():
    assert all((ROOT / p).is_dir() for p in PRODUCT)


def test_only_the_dispatch_modules_queue_tasks():
    """apply_async / delay / send_task are called in the dispatch modules only (utilities/dispatch.py sends): everything else asks models_app/dispatch.py or gpus/dispatch.py."""
    wrong = []
    for path in product_files():
        relative = str(path.relative_to(ROOT))
        if relative in DISPATCH:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and isinstance(node.func, ast.Attribute)
                and node.func.attr in {"apply_async", "delay", "send_task"}
            ):
                wrong.append(f"{relative}:{node.lineno} calls .{node.func.attr}()")
    assert not wrong, wrong


@pytest.mark.parametrize("package", ["models_app", "gpus", "gateway", "policy"])
def test_nothing_imports_a_tasks_module(package):
    """Only Celery's autodiscovery (llamacontroller_site/celery.py) loads an app's tasks.py: no module of ours
    imports one, at the top or inside a function (imported_modules walks the whole tree)."""
    tasks = f"{package}.tasks"
    wrong = [
        f"{path} imports {name}"
        for other in PRODUCT
        for path, names in imported_modules(other).items()
        for name in names
        if (name == tasks or name.startswith(tasks + ".")) and path != f"{package}/tasks.py"
    ]
    assert not wrong, wrong
