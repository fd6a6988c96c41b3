"""Live GPU figures between the full refreshes.

The full refresh (`tasks.refresh_host`, sent by beat to each host's queue every GPU_REFRESH_SECONDS) samples the
GPUs, writes the GPU rows and the instances' memory, stores one history sample per GPU and per instance, and
evaluates the host's alert rules. Where a sample is cheap (NVML: ~0.1 ms; the simulated GPUs: 1–2 ms), the host's
worker also refreshes the figures alone every GPU_LIVE_SECONDS (`LiveRefresh`, a thread of its main process), so
the dashboard's cards are a couple of seconds old at most, while the stored history and the alert work keep the
slow rate. nvidia-smi (a process per query, tens of ms) is not in GPU_LIVE_BACKENDS by default.

A thread rather than a faster beat entry: a beat entry sends a message per host and tick through the broker, and
the host's pool runs it, behind loads that hold the pool's processes for minutes (the figures would stall just
when a load makes them interesting) and after messages that pile up for a host that is down. The thread needs
no broker, samples with the backend its process keeps (NVML initialised once), and writes only while the
heartbeat finds that the worker takes work (a worker cut off from the broker shows no fresher figures than its
host's state allows). It never writes the host's `last_seen` and never changes inventory or availability: a
failed query, a new GPU or a lost host wait for the full refresh, and the thread slows to that refresh's rate
until a sample succeeds again."""

import logging
import threading
from collections.abc import Callable

from django.conf import settings
from django.db import connections

from gpus import services as gpu_services

from . import memory

logger = logging.getLogger(__name__)


def wanted() -> bool:
    """Whether live figures are on: an interval shorter than the full refresh's."""
    return 0 < settings.GPU_LIVE_SECONDS < settings.GPU_REFRESH_SECONDS


class LiveRefresh(threading.Thread):
    """The live figures of this host, in its worker's main process. `may_run`: whether to write now (the
    worker's heartbeat says it takes work)."""

    def __init__(self, host_name: str, may_run: Callable[[], bool] = lambda: True):
        super().__init__(name=f"live-telemetry-{host_name}", daemon=True)
        self.host_name, self.may_run = host_name, may_run
        self.stopped = threading.Event()
        self.ticks = 0  # live refreshes written
        self.skipped: str | None = None  # why the last tick wrote nothing

    def run(self) -> None:
        delay = settings.GPU_LIVE_SECONDS
        while not self.stopped.wait(delay):
            try:
                delay = self.tick()
            finally:
                connections.close_all()  # none held between ticks (PostgreSQL: back to the process's pool)

    def tick(self) -> float:
        """One live refresh. Returns the seconds to the next: the live interval, or the full refresh's after
        a tick that could not sample (a failing or slow backend is not asked more often than the beat asks)."""
        if not self.may_run():
            return self._skip("the worker does not take work (no heartbeat)", settings.GPU_LIVE_SECONDS)
        try:
            backend = gpu_services.current_backend().name
            if backend not in settings.GPU_LIVE_BACKENDS:
                return self._skip(f"the {backend} backend is not in GPU_LIVE_BACKENDS")
            sampled = memory.refresh_live(self.host_name)
        except Exception as exc:  # the database may be briefly away; a backend may fail to start
            return self._skip(f"{type(exc).__name__}: {exc}")
        if sampled.error:
            return self._skip(f"GPU query failed: {sampled.error}")
        if self.skipped:
            logger.info("%s: live GPU figures resume", self.host_name)
        self.skipped = None
        self.ticks += 1
        return settings.GPU_LIVE_SECONDS

    def _skip(self, reason: str, delay: float | None = None) -> float:
        if reason != self.skipped:
            logger.info("%s: no live GPU figures: %s", self.host_name, reason)
        self.skipped = reason
        return settings.GPU_REFRESH_SECONDS if delay is None else delay

    def stop(self) -> None:
        self.stopped.set()
