"""Sleep/wake detection: when the wall clock jumps ahead of the monotonic clock, check now.

A laptop that slept for an hour comes back with TCP connections that are dead but do not know
it yet. The detector compares how far the wall clock and the monotonic clock moved between two
ticks (the monotonic clock stops during sleep on macOS and Linux' CLOCK_MONOTONIC); a gap
beyond ``threshold`` calls ``check_now()`` on every registered unit at once, instead of waiting
for keepalive timers. Clocks are injected so tests drive it with fake time.
"""

from __future__ import annotations

import logging
import threading
from typing import Protocol, runtime_checkable

from .timing import SYSTEM_CLOCK, Clock

log = logging.getLogger(__name__)

TICK = 5.0          # seconds between comparisons
THRESHOLD = 10.0    # a jump larger than this means the machine slept (or the clock was set)


@runtime_checkable
class Checkable(Protocol):
    def check_now(self) -> None: ...


class WakeDetector:
    """Calls ``check_now()`` on every registered unit after a wall/monotonic clock jump."""

    def __init__(self, *, clock: Clock = SYSTEM_CLOCK, tick: float = TICK, threshold: float = THRESHOLD) -> None:
        self._clock = clock
        self._wall = clock.time
        self._mono = clock.monotonic
        self._tick = tick
        self._threshold = threshold
        self._units: dict[int, Checkable] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
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
            units = list(self._units.values())
        for unit in units:
            try:
                unit.check_now()
            except Exception:
                log.exception("check_now failed after wake")

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._last = (self._wall(), self._mono())
            self._thread = threading.Thread(target=self._run, name="wake-detector", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        while not self._clock.wait(self._stop, self._tick):
            self.poll()

    def stop(self) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(5)

    def __enter__(self) -> "WakeDetector":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
