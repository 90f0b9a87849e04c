"""When each engine unit steps next: one schedule for every keeper, driven by the engine loop.

A unit (a credential keeper, a tunnel's keeper) has one method that matters here: ``step()``
does whatever is due (it may block: it runs on the engine loop's worker pool, never on the loop)
and returns the delay to its next step. ``Scheduler`` holds each unit's due time on the engine's
``Clock`` (monotonic readings) and the wakes that make a unit due at once. Production drives it
with ``Scheduler.drive`` on the ``EngineLoop`` (one task; at most one step per unit in flight;
the loop sleeps until the next due time or a wake); tests drive the same schedule in virtual time
(``tests/helpers/fakevault.run_virtual``), so what the tests prove is what runs.

A wake that arrives while the unit is stepping is not lost: the unit steps again right after.
A unit whose ``step`` never blocks (``steps_on_loop = True``: the wake detector's comparison of two
clocks) steps on the loop itself, so an idle engine's periodic step costs one wake-up, not a
hand-off to a worker and back (issue 17).
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
from typing import TYPE_CHECKING, Callable, Protocol

from ..core.timing import Clock

if TYPE_CHECKING:
    from .engine_loop import EngineLoop

log = logging.getLogger(__name__)

MIN_DELAY = 0.0


class Steppable(Protocol):
    """What the scheduler drives."""

    name: str

    def step(self) -> float:
        """Do what is due; return the delay (seconds) to the next step (``math.inf``: only on a wake)."""
        ...


class Scheduler:
    """Due times (``clock.monotonic()``) of the engine's units. Thread-safe: ``wake`` may come
    from any thread (a tray click, a credential event, the data path)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self._lock = threading.Lock()
        self._due: dict[Steppable, float] = {}
        self._stepping: set[Steppable] = set()
        self._woken_while_stepping: set[Steppable] = set()
        self._nudge: Callable[[], None] = lambda: None

    # membership
    def add(self, unit: Steppable, delay: float = 0.0) -> None:
        """Schedule ``unit``'s first step ``delay`` seconds from now (idempotent: an added unit keeps
        its schedule)."""
        with self._lock:
            self._due.setdefault(unit, self.clock.monotonic() + max(MIN_DELAY, delay))
        self._nudge()

    def remove(self, unit: Steppable) -> None:
        """No more steps for ``unit`` (a step in flight finishes; it is not rescheduled)."""
        with self._lock:
            self._due.pop(unit, None)
            self._woken_while_stepping.discard(unit)

    def units(self) -> list[Steppable]:
        with self._lock:
            return list(self._due)

    def __contains__(self, unit: object) -> bool:
        with self._lock:
            return unit in self._due

    # wakes
    def wake(self, unit: Steppable) -> None:
        """Make ``unit`` due now (again right after its current step, if one is running)."""
        with self._lock:
            if unit not in self._due:
                return
            if unit in self._stepping:
                self._woken_while_stepping.add(unit)
            else:
                self._due[unit] = min(self._due[unit], self.clock.monotonic())
        self._nudge()

    def wake_all(self) -> None:
        for unit in self.units():
            self.wake(unit)

    # the driver's side
    def take_due(self) -> list[Steppable]:
        """The units due now that are not stepping; they are marked as stepping (earliest first)."""
        now = self.clock.monotonic()
        with self._lock:
            due = sorted((at, i, u) for i, (u, at) in enumerate(self._due.items())
                         if at <= now and u not in self._stepping)
            units = [u for _, _, u in due]
            self._stepping.update(units)
            return units

    def stepped(self, unit: Steppable, delay: float) -> None:
        """``unit`` finished a step that asked for ``delay``; schedule the next one."""
        if math.isnan(delay) or delay < 0:
            log.error("%s: step returned %r; stepping again in 1 s", getattr(unit, "name", unit), delay)
            delay = 1.0
        with self._lock:
            self._stepping.discard(unit)
            if unit not in self._due:
                return
            if unit in self._woken_while_stepping:
                self._woken_while_stepping.discard(unit)
                delay = 0.0
            self._due[unit] = self.clock.monotonic() + delay
        self._nudge()

    def next_due(self) -> float:
        """The earliest due time of a unit that is not stepping (``math.inf`` when none)."""
        with self._lock:
            times = [at for u, at in self._due.items() if u not in self._stepping]
        return min(times, default=math.inf)

    def idle(self) -> bool:
        """No unit steps now or has a step due at a finite time: only wakes move it (issue 17:
        what an engine of idle tunnels looks like)."""
        with self._lock:
            return not self._stepping and all(math.isinf(at) for at in self._due.values())

    # production: the engine loop drives the schedule
    async def drive(self, engine: "EngineLoop") -> None:
        """Run forever on ``engine``'s loop (cancel the task to stop): step every due unit on the
        worker pool, sleep until the next due time or a wake."""
        nudged = asyncio.Event()
        self._nudge = lambda: engine.call(nudged.set)
        tasks: set[asyncio.Task[None]] = set()
        try:
            while True:
                nudged.clear()
                for unit in self.take_due():
                    task = asyncio.get_running_loop().create_task(self._step(engine, unit))
                    tasks.add(task)
                    task.add_done_callback(tasks.discard)
                wait = self.next_due() - self.clock.monotonic()
                if wait > 0:
                    try:
                        await asyncio.wait_for(nudged.wait(), None if math.isinf(wait) else wait)
                    except asyncio.TimeoutError:
                        pass
        finally:
            self._nudge = lambda: None
            for task in tasks:
                task.cancel()

    async def _step(self, engine: "EngineLoop", unit: Steppable) -> None:
        """One step on the worker pool. No deadline here: a step's blocking calls carry their own
        (HTTP and socket timeouts), and a second step of the same unit must never overlap it."""
        delay = 1.0
        try:
            if getattr(unit, "steps_on_loop", False):
                delay = unit.step()
            else:
                delay = await engine.run_blocking(unit.step)
        except Exception:          # step() itself must not raise (Keeper.step turns bugs into states)
            log.exception("%s: step raised; stepping again in 1 s", unit.name)
        finally:
            self.stepped(unit, delay)
