"""An alert end to end: a real Celery worker refreshes a simulated GPU whose used memory grows (a real process
whose RSS grows), the rule fires once, the webhook reaches a local receiver (an http.server thread) through
the worker's delivery task, and when the memory is freed the alert resolves and that is delivered too."""

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from gpus.models import Alert, AlertRule
from tests.conftest import FAKE_GPU_UUIDS
from tests.e2e.test_refresh_worker import refresh_through_worker
from tests.helpers import grow, running_instance

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


class Receiver:
    """A webhook receiver on a free loopback port; the first POST answers 500 (the task must retry)."""

    def __init__(self):
        self.bodies: list[dict] = []
        self.attempts = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                receiver.attempts += 1
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if receiver.attempts == 1:
                    self.send_response(500)
                    self.end_headers()
                    return
                receiver.bodies.append(body)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, event: str, timeout: float = 60.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for body in self.bodies:
                if body["event"] == event:
                    return body
            time.sleep(0.2)
        raise AssertionError(f"no {event!r} webhook within {timeout}s; got {self.bodies}")

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def test_growing_memory_fires_delivers_and_resolves(
    start_worker, fake_gpus, tiny_model, child_on_gpus, receiver
):
    # A small simulated GPU, so that a process growing by 64 MiB steps crosses the threshold.
    data = json.loads(fake_gpus.path.read_text())
    data["gpus"][0]["memory_total_mib"] = 400
    fake_gpus.write(gpus=data["gpus"])
    AlertRule.objects.all().delete()
    rule = AlertRule.objects.create(
        name="GPU over half full",
        kind="gpu_used_pct",
        threshold=50,
        hysteresis=10,
        for_minutes=0,
        clear_minutes=0,
    )
    child = child_on_gpus(FAKE_GPU_UUIDS[0])
    running_instance(fake_gpus.host, tiny_model, fake_gpus.gpus[:1], pid=child.pid)
    start_worker(LLAMACONTROLLER_ALERT_WEBHOOK_URLS=receiver.url)

    refresh_through_worker()
    assert not Alert.objects.exists(), "below the threshold at first"

    for _ in range(4):  # +256 MiB of real memory: well past 50 % of 400 MiB
        grow(child)
    refresh_through_worker()
    alert = Alert.objects.get()
    assert (alert.rule_id, alert.status) == (rule.pk, "open")
    fired = receiver.wait_for("fired")
    assert fired["text"].startswith("[FIRING]") and "GPU over half full" in fired["text"]
    assert fired["alert"]["id"] == alert.pk and fired["alert"]["status"] == "open"
    assert receiver.attempts >= 2, "the first POST answered 500 and was retried"

    refresh_through_worker()  # still over: fires once, stays open
    assert Alert.objects.filter(status="open").count() == 1

    child.kill()  # the memory is freed
    child.wait()
    refresh_through_worker()
    alert.refresh_from_db()
    assert alert.status == "resolved" and alert.resolved_at is not None
    resolved = receiver.wait_for("resolved")
    assert resolved["text"].startswith("[RESOLVED]") and resolved["alert"]["status"] == "resolved"
    assert [b["event"] for b in receiver.bodies] == ["fired", "resolved"]
