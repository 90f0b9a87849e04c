"""Sleep/wake detection: when the wall clock jumps ahead of the monotonic clock, check now.

A laptop that slept for an hour comes back with TCP connections that are dead but do not know
it yet. The detector compares how far the wall clock and the monotonic clock moved between two
ticks (the monotonic clock stops during sleep on macOS and Linux' CLOCK_MONOTONIC); a gap
beyond ``threshold`` wakes every unit of the engine's scheduler and calls ``check_now()`` on every
registered unit at once, instead of waiting for keepalive timers. The detector is itself a unit
of that scheduler (``step`` compares the clocks every ``tick`` s, on the engine loop itself: it
never blocks); it owns no thread. Clocks are injected so tests drive it with fake time.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ..core.timing import SYSTEM_CLOCK, Clock
from .coalesced_timers import next_on_grid

if TYPE_CHECKING:
    from .scheduler import Scheduler

log = logging.getLogger(__name__)

TICK = 5.0          # seconds between comparisons
THRESHOLD = 10.0    # a jump larger than this means the machine slept (or the clock was set)


@runtime_checkable
class Checkable(Protocol):
    def check_now(self) -> None: ...


class WakeDetector:
    """After a wall/monotonic clock jump: wakes the scheduler's units, calls ``check_now()`` on the registered ones."""

    name = "wake-detector"
    steps_on_loop = True       # ``step`` reads two clocks (and, after a jump, only wakes units): never blocks

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, tick: float = TICK, threshold: float = THRESHOLD) -> None:
        self._clock = clock
        self._wall = clock.time
        self._mono = clock.monotonic
        self._tick = tick
        self._threshold = threshold
        self._units: dict[int, Checkable] = {}
        self._lock = threading.Lock()
        self._scheduler: Scheduler | None = None
        self._last = (self._wall(), self._mono())
        self.wakes = 0

    def register(self, unit: Checkable) -> None:
        with self._lock:
            self._units[id(unit)] = unit

    def unregister(self, unit: object) -> None:
        with self._lock:
            self._units.pop(id(unit), None)

    def poll(self) -> float | None:
        """Compare the clocks once; on a jump, check every unit. Returns the jump (s) or None."""
        wall, mono = self._wall(), self._mono()
        last_wall, last_mono = self._last
        self._last = (wall, mono)
        jump = (wall - last_wall) - (mono - last_mono)
        if abs(jump) < self._threshold:
            return None
        self.wakes += 1
        log.info("clock jumped %+.0f s (sleep/wake or clock change): checking every tunnel now", jump)
        self._check_all()
        return jump

    def _check_all(self) -> None:
        with self._lock:
            units, scheduler = list(self._units.values()), self._scheduler
        if scheduler is not None:
            scheduler.wake_all()
        for unit in units:
            try:
                unit.check_now()
            except Exception:
                log.exception("check_now failed after wake")

    # a unit of the engine's scheduler
    def start(self, scheduler: "Scheduler") -> None:
        """Compare the clocks every ``tick`` s, starting one tick from now (idempotent)."""
        with self._lock:
            if self._scheduler is not None:
                return
            self._scheduler = scheduler
            self._last = (self._wall(), self._mono())
        scheduler.add(self, self._tick)

    def step(self) -> float:
        """Compare the clocks; the next tick is on the grid of ``tick`` s, where keepalive rounds
        with the same interval (5 s by default, both) wake the loop anyway."""
        self.poll()
        mono = self._mono()
        return next_on_grid(mono + self._tick / 2, self._tick) - mono     # half a tick at least

    def stop(self) -> None:
        with self._lock:
            scheduler, self._scheduler = self._scheduler, None
        if scheduler is not None:
            scheduler.remove(self)

    @property
    def running(self) -> bool:
        return self._scheduler is not None
