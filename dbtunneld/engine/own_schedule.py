"""A schedule of its own for one unit run outside the supervisor (standalone use, tests): an
``EngineLoop`` and a ``Scheduler`` driving just that unit, ended together by ``stop``.

On the system clock the driver is ``Scheduler.drive`` (what the supervisor runs). On another
clock (a ``FakeClock`` in tests) the wait between steps is that clock's own ``Clock.wait``, so a
test that moves the clock moves the schedule; the steps still run on the loop's worker pool.
"""

from __future__ import annotations

import threading
from typing import Any

from ..core.timing import Clock, SystemClock
from .engine_loop import EngineLoop
from .scheduler import Scheduler, Steppable

DUE_SLACK = 1e-6                  # the shortest wait on a fake clock (float rounding of due times)


class OwnSchedule:
    """``engine`` and ``scheduler`` for one unit; ``wake`` it from any thread; ``stop`` ends both."""

    def __init__(self, name: str, clock: Clock) -> None:
        self.engine = EngineLoop(name=name).start()
        self.scheduler = Scheduler(clock)
        self._clock = clock
        self._nudged: threading.Event | None = None
        if isinstance(clock, SystemClock):
            self._driver: Any = self.engine.submit(self.scheduler.drive(self.engine))
        else:
            self._nudged = threading.Event()
            self._driver = self.engine.submit(self._drive_on_clock())

    def add(self, unit: Steppable) -> None:
        self.scheduler.add(unit)
        if self._nudged is not None:
            self._nudged.set()

    def wake(self, unit: Steppable) -> None:
        self.scheduler.wake(unit)
        if self._nudged is not None:
            self._nudged.set()

    def stop(self, timeout: float = 5.0) -> None:
        self.engine.stop(timeout)

    async def _drive_on_clock(self) -> None:
        nudged = self._nudged
        assert nudged is not None
        while True:
            nudged.clear()
            for unit in self.scheduler.take_due():
                delay = 1.0
                try:
                    delay = await self.engine.run_blocking(unit.step)
                finally:
                    self.scheduler.stepped(unit, delay)
            wait = self.scheduler.next_due() - self._clock.monotonic()
            if wait > 0 and not nudged.is_set():
                await self.engine.run_blocking(self._clock.wait, nudged, max(wait, DUE_SLACK))
