"""Timers on the engine loop that share wake-ups: callbacks due within one ``GRAIN`` of each other
run in one loop turn, behind one ``loop.call_at`` (issue 17: idle timers coalesced in the engine's
loop). Loop thread only (reach it from elsewhere with ``EngineLoop.call``).

Each due time is rounded up to the next multiple of ``GRAIN`` on the loop's clock, so ten tunnels
whose keepalives fall due in the same slot wake the loop once; callbacks of a slot run in the
order they were added. ``call_at`` returns a handle whose ``cancel`` drops the callback (and the
slot's loop timer once the slot is empty).
"""

from __future__ import annotations

import asyncio
import logging
import math
from typing import Callable

log = logging.getLogger(__name__)

GRAIN = 0.02          # seconds: how late a callback may run so that it shares a wake-up


def next_on_grid(now: float, interval: float) -> float:
    """The first multiple of ``interval`` after ``now`` (monotonic seconds, the loop's clock): work
    repeating every ``interval`` s that sits on this grid (every tunnel's keepalive rounds, the
    wake detector's ticks) falls due at once and shares the loop's wake-ups."""
    return (math.floor(now / interval) + 1) * interval


class TimerHandle:
    """One callback in a slot; ``cancel`` is idempotent."""

    def __init__(self, timers: "CoalescedTimers", slot: int, fn: Callable[[], None]) -> None:
        self._timers, self.slot, self.fn = timers, slot, fn
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self._timers._drop(self)


class CoalescedTimers:
    """Slots of callbacks (slot = due time / ``grain``, rounded up), one loop timer per slot."""

    def __init__(self, loop: asyncio.AbstractEventLoop, grain: float = GRAIN) -> None:
        self._loop = loop
        self._grain = grain
        self._slots: dict[int, list[TimerHandle]] = {}
        self._timers: dict[int, asyncio.TimerHandle] = {}

    def time(self) -> float:
        """The loop's clock (what ``call_at`` times are read on)."""
        return self._loop.time()

    def call_at(self, when: float, fn: Callable[[], None]) -> TimerHandle:
        """Run ``fn()`` on the loop at ``when`` (loop clock), or up to ``grain`` later."""
        slot = math.ceil(when / self._grain)
        handle = TimerHandle(self, slot, fn)
        entries = self._slots.setdefault(slot, [])
        entries.append(handle)
        if slot not in self._timers:
            self._timers[slot] = self._loop.call_at(slot * self._grain, self._fire, slot)
        return handle

    def call_later(self, delay: float, fn: Callable[[], None]) -> TimerHandle:
        return self.call_at(self.time() + delay, fn)

    def pending(self) -> int:
        """Callbacks waiting (tests and figures)."""
        return sum(len(entries) for entries in self._slots.values())

    def _drop(self, handle: TimerHandle) -> None:
        entries = self._slots.get(handle.slot)
        if entries is None or handle not in entries:
            return
        entries.remove(handle)
        if not entries:
            del self._slots[handle.slot]
            timer = self._timers.pop(handle.slot, None)
            if timer is not None:
                timer.cancel()

    def _fire(self, slot: int) -> None:
        self._timers.pop(slot, None)
        for handle in self._slots.pop(slot, []):
            if handle.cancelled:
                continue
            handle.cancelled = True           # ran: a late cancel is a no-op
            try:
                handle.fn()
            except Exception:                 # one callback's bug must not starve the rest of the slot
                log.exception("timer callback %r failed", handle.fn)
