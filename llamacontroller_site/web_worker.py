"""The web server's worker: uvicorn_worker.UvicornWorker, with uvicorn's housekeeping tick once a second
instead of ten times.

uvicorn's server wakes every 0.1 s to refresh its Date header (once a second), tell gunicorn's arbiter it is
alive (every `timeout_notify` seconds) and check whether to stop. On an idle or lightly used worker each of
those wake-ups is paid cold (~125 us of CPU here, 1.25 ms a second per idle worker): beside a slow stream,
chunks 50 ms apart as a GPU's 20 tokens/s make them, that was half a wake-up per chunk, ~60 us of the
gateway's ~370 us per chunk. Once a second does the same work: the Date header stays exact to the second,
the arbiter still hears from the worker well within its timeout, and a signal to stop is seen within a
second (gunicorn's graceful timeout is 10 s)."""

import asyncio
import sys

from gunicorn.arbiter import Arbiter
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker as _UvicornWorker

TICK_SECONDS = 1.0


class _Server(Server):
    async def main_loop(self) -> None:
        # uvicorn's own loop, its counter in tenths of a second as on_tick expects (% 10 == 0: every tick).
        counter = 0
        should_exit = await self.on_tick(counter)
        while not should_exit:
            counter = (counter + 10) % 864000
            await asyncio.sleep(TICK_SECONDS)
            should_exit = await self.on_tick(counter)


class UvicornWorker(_UvicornWorker):
    async def _serve(self) -> None:  # uvicorn_worker's, with the server above
        self.config.app = self.wsgi
        server = _Server(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
