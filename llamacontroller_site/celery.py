"""The Celery app. Tasks take ids only (JSON), and lifecycle/telemetry tasks go to the owning host's queue."""

import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "llamacontroller_site.settings")

app = Celery("llamacontroller")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@app.task(name="llamacontroller.ping")
def ping() -> str:
    """Round trip through broker and worker: used by /healthz and the tests."""
    return "pong"
