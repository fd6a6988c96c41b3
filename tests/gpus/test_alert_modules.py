"""The alert code in two rooms (issue 18): `gpus/alert_rules.py` says what raises and clears which alert and
in what words; `gpus/alerts.py`, the engine, runs the rules, keeps the alerts' state and schedules delivery.
The rules never import the engine, delivery or the database layer, so they stay plain functions over rows."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def imports_of(relative: str) -> set[str]:
    """Every module the file imports, relative imports resolved against its package (`.models` in
    gpus/alert_rules.py is gpus.models), imports inside functions included."""
    package = relative.removesuffix(".py").split("/")[:-1]
    names = set()
    for node in ast.walk(ast.parse((ROOT / relative).read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.update(f"{module}.{alias.name}" for alias in node.names)  # `from . import x` names x
            names.add(module)
    return names


def test_the_rules_import_neither_the_engine_nor_delivery_nor_the_database_layer():
    names = imports_of("gpus/alert_rules.py")
    assert "gpus.models" in names  # resolved as a module, so the check below can see what it imports
    forbidden = ("gpus.alerts", "gpus.tasks", "gpus.notify", "django.db", "models_app")
    wrong = sorted(n for n in names if any(n == f or n.startswith(f + ".") for f in forbidden))
    assert not wrong, wrong


def test_the_engine_takes_its_rules_from_the_rules_module():
    assert "gpus.alert_rules" in imports_of("gpus/alerts.py")


def test_each_alert_module_stays_under_400_lines():
    sizes = {f: len((ROOT / f).read_text().splitlines()) for f in ("gpus/alerts.py", "gpus/alert_rules.py")}
    assert all(n < 400 for n in sizes.values()), sizes
