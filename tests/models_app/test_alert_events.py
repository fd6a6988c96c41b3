"""Alerts that fire or resolve are audit events; an instance's alerts are on its timeline."""

import pytest

from gpus.alerts import Transition
from models_app import memory
from models_app.models import InstanceEvent


@pytest.mark.django_db
def test_alert_transitions_become_events():
    memory._record_alert_events(
        [
            Transition(alert_id=1, rule_name="GPU busy", event="fired", message="GPU 0 at 97 %", instance_id=None, gpu_id=1),
            Transition(alert_id=1, rule_name="GPU busy", event="resolved", message="back to 40 %", instance_id=None, gpu_id=1),
            Transition(alert_id=2, rule_name="Leak", event="fired", message="+300 MiB/h", instance_id=999, gpu_id=1),
        ]
    )  # fmt: skip
    rows = list(InstanceEvent.objects.order_by("id").values_list("kind", "instance_id", "detail"))
    assert rows == [
        ("alert_fired", None, "GPU busy: GPU 0 at 97 %"),
        ("alert_resolved", None, "GPU busy: back to 40 %"),
        ("alert_fired", None, "Leak: +300 MiB/h"),  # the instance is gone: the event stays, unlinked
    ]
