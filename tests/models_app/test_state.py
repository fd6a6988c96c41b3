"""The status table (models_app/state.py): every status is reachable, only a crash leads out of an ended
status, transition() refuses what the table does not allow, and every transition the product code asks for
in so many words is in the table."""

import ast
from pathlib import Path

import pytest

from models_app.models import GpuInstance
from models_app.state import (
    ACTIVE,
    ENDED,
    IN_TRANSITION,
    LEGAL_TRANSITIONS,
    LOADING_OR_RUNNING,
    IllegalTransition,
    sources_of,
    transition,
)
from tests.api.factories import make_gpus, make_instance

Status = GpuInstance.Status
ROOT = Path(__file__).resolve().parents[2]


def reachable_from(status: str) -> set[str]:
    seen, todo = set(), [status]
    while todo:
        for target in LEGAL_TRANSITIONS[todo.pop()]:
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def test_the_table_names_every_status_and_only_statuses():
    assert set(LEGAL_TRANSITIONS) == set(Status.values)
    assert set().union(*LEGAL_TRANSITIONS.values()) <= set(Status.values)
    assert all(status not in targets for status, targets in LEGAL_TRANSITIONS.items())  # no move in place


def test_every_status_is_reachable_from_a_new_instance():
    """A new instance is pending (the model's default); every other status can follow from there."""
    assert GpuInstance._meta.get_field("status").default == Status.PENDING
    assert reachable_from(Status.PENDING) | {Status.PENDING} == set(Status.values)


def test_an_ended_instance_stays_ended_except_a_crash_that_restarts():
    assert LEGAL_TRANSITIONS[Status.STOPPED] == set()
    assert LEGAL_TRANSITIONS[Status.FAILED] == set()
    assert LEGAL_TRANSITIONS[Status.CRASHED] == {Status.PENDING}  # maybe_restart


def test_every_active_status_can_end():
    for status in ACTIVE:
        assert reachable_from(status) & ENDED, status


def test_the_named_sets():
    assert set(Status.values) == ACTIVE | ENDED and not ACTIVE & ENDED
    assert LOADING_OR_RUNNING < ACTIVE and IN_TRANSITION < ACTIVE
    # The database's constraints spell the active statuses out: they must agree with the sets.
    conditions = {c.name: dict(c.condition.children) for c in GpuInstance._meta.constraints}
    assert set(conditions["instance_unique_active_port"]["status__in"]) == ACTIVE
    assert set(conditions["instance_one_on_demand_per_model"]["status__in"]) == ACTIVE - {Status.STOPPING}


def test_sources_of():
    assert sources_of(Status.STOPPING) == {Status.PENDING, Status.STARTING, Status.RUNNING}
    assert sources_of(Status.PENDING) == {Status.STARTING, Status.CRASHED}


@pytest.mark.django_db
def test_an_illegal_transition_raises_and_changes_nothing(tiny_model):
    instance = make_instance(make_gpus(1), tiny_model, status=Status.RUNNING)
    with pytest.raises(IllegalTransition, match="running"):
        transition(instance, Status.STOPPED, expected=[Status.RUNNING], event_kind="unloaded")
    with pytest.raises(IllegalTransition):
        transition(instance, Status.STOPPED, expected=[], event_kind="unloaded")
    instance.refresh_from_db()
    assert instance.status == Status.RUNNING and not instance.events.exists()


@pytest.mark.django_db
def test_without_expected_every_legal_source_is_expected(tiny_model):
    instance = make_instance(make_gpus(1), tiny_model, status=Status.STARTING)
    assert transition(instance, Status.UNKNOWN, event_kind="host_lost")
    assert GpuInstance.objects.get(pk=instance.pk).status == Status.UNKNOWN
    # From a status with no legal move there, it loses as a race would: False, nothing changed.
    assert not transition(instance, Status.STOPPING, event_kind="unload_requested")
    assert GpuInstance.objects.get(pk=instance.pk).status == Status.UNKNOWN


def spelled_out_transitions() -> list[tuple[str, str, list[str]]]:
    """(where, to, from-list) of each transition(...) call in product code whose target and `expected` are
    written as Status.X literals."""

    def status_of(node):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "Status":
            return Status[node.attr].value
        return None

    found = []
    for package in ("models_app", "gpus", "gateway", "accounts"):
        for path in (ROOT / package).rglob("*.py"):
            if "migrations" in path.parts:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if not isinstance(node, ast.Call) or len(node.args) < 2:
                    continue
                name = getattr(node.func, "id", None) or getattr(node.func, "attr", None)
                target = status_of(node.args[1])
                if name != "transition" or target is None:
                    continue
                expected = next((k.value for k in node.keywords if k.arg == "expected"), None)
                if isinstance(expected, ast.List | ast.Tuple):
                    sources = [status_of(e) for e in expected.elts]
                    if None in sources:
                        continue
                elif expected is None:
                    sources = list(sources_of(target))
                else:
                    continue  # computed at run time: transition() checks it then
                found.append((f"{path.relative_to(ROOT)}:{node.lineno}", target, sources))
    return found


def test_the_product_asks_only_for_legal_transitions():
    calls = spelled_out_transitions()
    assert len(calls) > 10, calls  # the scan sees the calls (load, stop, reconcile, hosts, services ...)
    wrong = [
        f"{where}: {sources} → {to}" for where, to, sources in calls if not set(sources) <= sources_of(to)
    ]
    assert not wrong, wrong
