"""Two `celery beat` processes by mistake, against the real broker and a real worker: every reconcile period
both beats send dispatch_reconcile, and the host still gets one reconcile message per period (utilities/periodic.py).

Deterministic by construction: both beats start together, so one of them (the leader) sends each period's
message up to about a second before the other; the leader's message takes the lock (0.8 of the period, 2.4 s)
and the follower's finds it held. So the host's queue gets exactly as many reconcile messages as the leader
sent, not the sum of both beats'. Only reconcile is due within the test (the other periods are set long)."""

import json
import re
import subprocess
import sys
import time
import uuid

import pytest
import redis
from django.conf import settings
from django.utils import timezone

from gpus.models import Host
from tests.conftest import REPO, CeleryWorker, purge_queues, worker_env
from tests.helpers import wait_until
from utilities.periodic import lock_key

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

PERIOD = 3
SENT = re.compile(r"Sending due task reconcile-instances")
QUIET = {  # nothing else is due while the test runs
    "LLAMACONTROLLER_RECONCILE_SECONDS": PERIOD,
    "LLAMACONTROLLER_GPU_REFRESH_SECONDS": 600,
    "LLAMACONTROLLER_IDLE_CHECK_SECONDS": 600,
    "LLAMACONTROLLER_HOST_TIMEOUT_SECONDS": 600,
}


def test_two_beats_reconcile_each_host_once_per_period(tmp_path):
    host = Host.objects.create(name=f"beatbox-{uuid.uuid4().hex[:6]}", last_seen=timezone.now())
    broker = redis.Redis.from_url(settings.REDIS_URL)
    purge_queues("default", host.queue)
    broker.delete(lock_key("models_app.tasks.dispatch_reconcile"))

    # The web node's worker: the default queue only (it claims no host).
    worker = CeleryWorker(tmp_path / "worker.log", "default", **QUIET).start()
    beats, logs = [], [tmp_path / "beat-a.log", tmp_path / "beat-b.log"]
    try:
        for name, log in zip("ab", logs, strict=True):
            argv = [sys.executable, "-m", "celery", "-A", "llamacontroller_site", "beat", "-l", "INFO",
                    "-s", str(tmp_path / f"schedule-{name}")]  # fmt: skip
            with open(log, "ab") as out:
                beats.append(
                    subprocess.Popen(
                        argv,
                        cwd=REPO,
                        env=worker_env(**QUIET),
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )  # fmt: skip
                )

        def sent() -> list[int]:
            return [len(SENT.findall(log.read_text(errors="replace"))) for log in logs]

        wait_until(lambda: min(sent()) >= 2, 30, "both beats to send reconcile twice")
        # Beat logs "Sending due task" before it publishes: a beat stopped at once may never publish its last
        # message (seen once under load). The next one is due a period later, so a second changes no count.
        time.sleep(1)
    finally:
        for beat in beats:
            beat.terminate()
        for beat in beats:
            beat.wait(10)
    sent_a, sent_b = sent()
    try:
        done = re.compile(r"Task models_app\.tasks\.dispatch_reconcile\[[^\]]+\] (succeeded|expired|revoked)")
        wait_until(
            lambda: len(done.findall(worker.log_path.read_text(errors="replace"))) >= sent_a + sent_b,
            15,
            "the worker to take them all",
        )
        log = worker.log_path.read_text(errors="replace")
    finally:
        worker.stop()

    reconciles = [
        m
        for m in broker.lrange(host.queue, 0, -1)
        if json.loads(m)["headers"]["task"].endswith("reconcile_host")
    ]
    broker.delete(host.queue)
    assert "expired" not in " ".join(done.findall(log)), log[-3000:]
    # Without the lock: sent_a + sent_b. With it: one per period, the leader's.
    assert len(reconciles) == max(sent_a, sent_b), (sent_a, sent_b, len(reconciles))
    assert len(reconciles) < sent_a + sent_b
