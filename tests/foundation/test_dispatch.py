"""The dispatch modules queue tasks by name (utilities/dispatch.py): every name they use must be a task that
Celery's autodiscovery registers, or a message would wait in a queue that no worker can run."""

import ast
from pathlib import Path
from unittest import mock

import pytest

from gpus import dispatch as gpus_dispatch
from llamacontroller_site.celery import app
from models_app import dispatch as models_dispatch
from utilities import dispatch

ROOT = Path(__file__).resolve().parents[2]


def task_names_in(module) -> set[str]:
    """Every string constant of the module that names a task (`<app>.tasks.<name>`)."""
    tree = ast.parse(Path(module.__file__).read_text())
    return {
        node.value
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and ".tasks." in node.value
    }


@pytest.mark.parametrize("module", [models_dispatch, gpus_dispatch], ids=["models_app", "gpus"])
def test_every_task_name_dispatch_uses_is_registered(module):
    app.loader.import_default_modules()  # as a worker starts: Celery's autodiscovery of every app's tasks.py
    registered = set(app.tasks)
    used = task_names_in(module)
    assert used, "no task names found"
    assert used == set(module.NAMES)
    assert not used - registered, sorted(used - registered)


def test_publish_sends_by_name_with_the_options_and_no_result():
    with mock.patch.object(dispatch, "current_app") as current:  # the project's app (or a test's probe app)
        dispatch.publish("models_app.tasks.reconcile_host", ["h"], {"queue": "host.h", "expires": 4.0})
    current.send_task.assert_called_once_with(
        "models_app.tasks.reconcile_host", args=["h"], ignore_result=True, queue="host.h", expires=4.0
    )


@pytest.mark.django_db
def test_send_at_once_or_on_commit(monkeypatch, django_capture_on_commit_callbacks):
    published = []
    monkeypatch.setattr(
        dispatch, "publish", lambda name, args, options: published.append((name, args, options))
    )
    dispatch.send("x.tasks.a", (1,), at_once=True, queue="q")
    assert published == [("x.tasks.a", [1], {"queue": "q"})]
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        dispatch.send("x.tasks.b", [2], at_once=False)
        assert len(published) == 1  # not before the commit
    assert len(callbacks) == 1 and published[1] == ("x.tasks.b", [2], {})


def test_a_broker_error_goes_to_on_error_or_rises(monkeypatch):
    def broken(name, args, options):
        raise ConnectionError("broker went away")

    monkeypatch.setattr(dispatch, "publish", broken)
    with pytest.raises(ConnectionError):
        dispatch.send("x.tasks.a", [], at_once=True)
    seen = []
    dispatch.send("x.tasks.a", [], at_once=True, on_error=seen.append)
    assert [str(e) for e in seen] == ["broker went away"]
