"""A tunnel's SSH keepalives and the watch on its upstream's end, on the engine loop, by events.

``UpstreamWatch`` is the only periodic work of an idle tunnel, and only when the user configured
keepalives (``tunnels.keepalive_interval``; a transport whose upstream keeps itself alive has
none): each round sends one keepalive (``Transport.keepalive``: from the loop when that cannot
block, else on a worker) and looks, ``health_timeout`` later, whether it was answered or bytes
came from the upstream meanwhile (busy, not dead). Rounds sit on a grid of the interval on the
loop's clock and on ``CoalescedTimers``, so the tunnels of one engine ping in the same loop turn
and the answer check shares the next round's wake-up when ``health_timeout`` equals the interval.
A reply only flips a flag on paramiko's reader thread: it never wakes the loop.

The upstream's end comes from ``Transport.on_closed`` (no polling). Either news is told once
through ``on_trouble(reason)``: "died" or "silent"; the tunnel's keeper does the rest.
"""

from __future__ import annotations

import logging
import math
import threading
from typing import Any, Callable

from ..adapters.transport import Transport
from ..core.config import TunnelSettings
from .coalesced_timers import TimerHandle, next_on_grid
from .engine_loop import EngineLoop

log = logging.getLogger(__name__)


class _Ping:
    """One keepalive in flight: answered yet? bytes received when it left."""

    __slots__ = ("answered", "flowed")

    def __init__(self, flowed: int) -> None:
        self.answered = False
        self.flowed = flowed

    def answer(self) -> None:         # paramiko's reader thread: a flag, no wake-up
        self.answered = True


class UpstreamWatch:
    """Keepalives every ``interval`` s (``math.inf``: none) and the end of ``transport``'s current
    upstream; ``on_trouble("died" | "silent")`` at most once, from any thread. ``traffic()``:
    bytes received from the upstream so far. ``stop`` (any thread) ends the watch."""

    def __init__(self, engine: EngineLoop, transport: Transport, interval: float, timeout: float,
                 traffic: Callable[[], int], on_trouble: Callable[[str], None]) -> None:
        self._engine = engine
        self._transport = transport
        self._interval = interval
        self._timeout = timeout
        self._traffic = traffic
        self._on_trouble = on_trouble
        self._lock = threading.Lock()
        self._told = False
        self._handles: set[TimerHandle] = set()      # loop thread only
        self.rounds = 0                               # keepalives sent (tests, figures)

    def start(self) -> None:
        """Listen for the upstream's end, and start the rounds (any thread)."""
        self._transport.on_closed(lambda: self._tell("died"))
        if self._interval > 0 and not math.isinf(self._interval):
            self._engine.call(self._schedule_round)

    def stop(self) -> None:
        """No more rounds, nothing more told. Any thread; idempotent."""
        with self._lock:
            self._told = True
        self._engine.call(self._cancel_all)

    # ---- on the loop ------------------------------------------------------------------------------

    def _schedule_round(self, at: float | None = None) -> None:
        """The next round at ``at`` (a grid time), or at the next grid time: the first round, or
        one after a loop so late that ``at`` has passed (no rounds to catch up)."""
        if self._told:
            return
        now = self._engine.timers.time()
        when = at if at is not None and at > now else next_on_grid(now, self._interval)
        self._later(when, lambda: self._round(when))

    def _round(self, at: float) -> None:
        """The round due at ``at`` (a grid time): its judgement is due at ``at + timeout``, on
        the grid too when the timeout is a multiple of the interval (the default: both 5 s)."""
        if self._told:
            return
        ping = _Ping(self._traffic())
        sent = self._transport.keepalive(ping.answer)
        if sent is False:
            return self._tell("died")
        if sent is None:                    # it would block (or has no evented keepalive): a worker
            self._engine.loop.run_in_executor(None, self._send_waiting, ping)
        self.rounds += 1
        self._later(at + self._timeout, lambda: self._judge(ping))
        self._schedule_round(at + self._interval)      # from the grid time, not the clock: never twice

    def _send_waiting(self, ping: _Ping) -> None:
        """Worker thread: send with waiting; a transport without an evented one pings (blocking)."""
        try:
            sent = self._transport.keepalive(ping.answer, wait=True)
            if sent is None and self._transport.ping(self._timeout):
                ping.answer()
        except Exception as exc:      # an error is no answer; the judgement says what it means
            log.debug("keepalive: %s: %s", type(exc).__name__, exc)

    def _judge(self, ping: _Ping) -> None:
        if ping.answered or self._told:
            return
        if self._traffic() != ping.flowed:
            log.info("keepalive answer late while data flows; the upstream is alive")
            return
        self._tell("silent")

    def _later(self, when: float, fn: Callable[[], None]) -> None:
        handle: Any = None

        def run() -> None:
            self._handles.discard(handle)
            fn()
        handle = self._engine.timers.call_at(when, run)
        self._handles.add(handle)

    def _cancel_all(self) -> None:
        handles, self._handles = self._handles, set()
        for handle in handles:
            handle.cancel()

    # ---- any thread -------------------------------------------------------------------------------

    def _tell(self, reason: str) -> None:
        with self._lock:
            if self._told:
                return
            self._told = True
        self._engine.call(self._cancel_all)
        self._on_trouble(reason)


class WatchSlot:
    """A tunnel's current ``UpstreamWatch`` (at most one): ``replace`` starts a new one and stops
    the one before; ``clear`` stops it. Any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._watch: UpstreamWatch | None = None

    def replace(self, watch: UpstreamWatch | None) -> None:
        with self._lock:
            old, self._watch = self._watch, watch
        if old is not None:
            old.stop()
        if watch is not None:
            watch.start()

    def watch(self, engine: EngineLoop, transport: Transport, settings: TunnelSettings,
              traffic: Callable[[], int], on_trouble: Callable[[str], None]) -> None:
        """Watch ``transport``'s current upstream with ``settings``' keepalive interval (as the
        transport adjusts it: ``Transport.ping_interval``) and health timeout."""
        interval = transport.ping_interval(settings.keepalive_interval)
        self.replace(UpstreamWatch(engine, transport, interval, settings.health_timeout, traffic, on_trouble))

    def clear(self) -> None:
        self.replace(None)
