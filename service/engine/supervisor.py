"""Keeps one of the engine's background tasks running: a crash is logged with its traceback, counted, and the
task started again; a task that keeps crashing is given up on, and the engine reports itself unhealthy.

A background task that dies unwatched is the worst failure an event service can have: every request then waits
for ever while the probes still say 200. Supervision turns that into either a restart or a failed liveness probe
(Kubernetes restarts the pod).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)


class SupervisedTask:
    """Runs `body()` as a task until it returns or is cancelled, starting it again each time it raises.

    Gives up (`gave_up`) after `max_crashes` crashes within `window_s` seconds: something is broken for good.
    `on_crash(name)` is called once per crash (the engine counts them in a metric).
    """

    def __init__(
        self,
        name: str,
        body: Callable[[], Awaitable[None]],
        *,
        on_crash: Callable[[str], None] = lambda name: None,
        max_crashes: int = 5,
        window_s: float = 60.0,
        first_backoff_s: float = 0.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self._body = body
        self._on_crash = on_crash
        self._max_crashes = max_crashes
        self._window_s = window_s
        self._first_backoff_s = first_backoff_s
        self._clock = clock
        self._crash_times: list[float] = []
        self.crashes = 0
        self.gave_up = False
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name=f"supervised {self.name}")
            self._task.add_done_callback(self._after)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            try:
                await self._body()
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                self.crashes += 1
                logger.exception("engine task %r crashed; starting it again", self.name)
                self._on_crash(self.name)
                now = self._clock()
                self._crash_times = [at for at in self._crash_times if now - at < self._window_s] + [now]
                if len(self._crash_times) >= self._max_crashes:
                    self.gave_up = True
                    logger.critical("engine task %r crashed %d times in %.0f s; giving up (the service reports "
                                    "itself unhealthy)", self.name, len(self._crash_times), self._window_s)
                    return
                # Yield at least once, so a task that crashes at once cannot starve the loop while it restarts.
                backoff = self._first_backoff_s * 2 ** (len(self._crash_times) - 1)
                await asyncio.sleep(min(backoff, 5.0))

    def _after(self, task: asyncio.Task[None]) -> None:
        # _run catches everything but cancellation; this is the last line of defence for a bug in _run itself.
        if not task.cancelled() and task.exception() is not None:
            self.gave_up = True
            logger.critical("engine task %r died", self.name, exc_info=task.exception())
