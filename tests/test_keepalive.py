"""Idle tunnels wake nothing but their keepalives, and those share wake-ups (issue 17):
``engine/coalesced_timers``, ``engine/keepalive.UpstreamWatch`` on a virtual loop, and ten real
tunnels on one engine loop that leave no timer and no scheduled step per tunnel once idle."""

from __future__ import annotations

import math
import socket
import threading
import time

import pytest

from dbtunneld.adapters.transport import Transport
from dbtunneld.core.config import TunnelSettings
from dbtunneld.core.errors import TransientError
from dbtunneld.core.model import TunnelState
from dbtunneld.core.timing import SYSTEM_CLOCK
from dbtunneld.engine.coalesced_timers import CoalescedTimers, next_on_grid
from dbtunneld.engine.engine_loop import EngineLoop
from dbtunneld.engine.keepalive import UpstreamWatch
from dbtunneld.engine.scheduler import Scheduler
from dbtunneld.engine.tunnel import Tunnel

from tunnel_servers import GreetingEchoServer


# ---- a loop in virtual time -------------------------------------------------------------------

class VirtualLoop:
    """The part of an asyncio loop the timers use (``time``, ``call_at``, ``run_in_executor``), in
    virtual time: ``advance`` runs what falls due; ``wakeups`` counts the turns that ran timers."""

    class Handle:
        def __init__(self, when: float, fn, args) -> None:
            self.when, self.fn, self.args, self.cancelled = when, fn, args, False

        def cancel(self) -> None:
            self.cancelled = True

    def __init__(self, start: float = 1000.0) -> None:
        self.now = start
        self.timers: list[VirtualLoop.Handle] = []
        self.wakeups = 0
        self.executor_calls = 0

    def time(self) -> float:
        return self.now

    def call_at(self, when, fn, *args):
        handle = VirtualLoop.Handle(when, fn, args)
        self.timers.append(handle)
        return handle

    def run_in_executor(self, _executor, fn, *args):
        self.executor_calls += 1
        fn(*args)

    def pending(self) -> list["VirtualLoop.Handle"]:
        return [h for h in self.timers if not h.cancelled]

    def advance(self, seconds: float) -> None:
        end = self.now + seconds
        while True:
            due = sorted((h for h in self.pending() if h.when <= end), key=lambda h: h.when)
            if not due:
                break
            self.now = max(self.now, due[0].when)
            batch = [h for h in due if h.when <= self.now]
            self.wakeups += 1                       # one loop turn runs every timer due by now
            for h in batch:
                self.timers.remove(h)
                h.fn(*h.args)
        self.now = end


class VirtualEngine:
    """An ``EngineLoop`` stand-in on a ``VirtualLoop``: ``call`` runs at once (we are the loop)."""

    def __init__(self) -> None:
        self.loop = VirtualLoop()
        self.timers = CoalescedTimers(self.loop)

    def call(self, fn, *args) -> None:
        fn(*args)


class PingedTransport(Transport):
    """Answers keepalives by event (``answered`` at once) while ``answering``; ``end()`` is the
    upstream closing underneath."""

    kind = "pinged"

    def __init__(self) -> None:
        self.answering = True
        self.keepalives = 0
        self.alive = True
        self._ended: list = []

    def connect(self) -> None:
        self.alive = True

    def open_channel(self, host, port, timeout):
        raise TransientError("no channels here")

    def is_alive(self) -> bool:
        return self.alive

    def keepalive(self, answered, wait=False):
        self.keepalives += 1
        if not self.alive:
            return False
        if self.answering:
            answered()
        return True

    def on_closed(self, callback) -> None:
        if self.alive:
            self._ended.append(callback)
        else:
            callback()

    def end(self) -> None:
        self.alive = False
        callbacks, self._ended = self._ended, []
        for callback in callbacks:
            callback()

    def close(self) -> None:
        self.end()


def watches(engine, count: int, interval: float = 5.0, timeout: float = 5.0):
    told: list[tuple[int, str]] = []
    made = []
    for i in range(count):
        transport = PingedTransport()
        watch = UpstreamWatch(engine, transport, interval, timeout, lambda: 0,
                              lambda reason, i=i: told.append((i, reason)))
        watch.start()
        made.append((watch, transport))
    return made, told


# ---- coalesced timers -------------------------------------------------------------------------

def test_callbacks_due_within_one_grain_share_one_loop_timer_and_run_in_order():
    loop = VirtualLoop(start=10.0)
    timers = CoalescedTimers(loop, grain=0.02)
    ran = []
    for i in range(10):
        timers.call_at(12.001 + i * 0.001, lambda i=i: ran.append(i))     # one slot: (12.0, 12.02]
    assert len(loop.pending()) == 1 and timers.pending() == 10
    loop.advance(3.0)
    assert ran == list(range(10)) and loop.wakeups == 1 and timers.pending() == 0


def test_cancelling_the_last_callback_of_a_slot_cancels_its_loop_timer():
    loop = VirtualLoop(start=0.0)
    timers = CoalescedTimers(loop)
    a, b = timers.call_at(1.0, lambda: None), timers.call_at(1.0, lambda: None)
    a.cancel()
    assert len(loop.pending()) == 1
    b.cancel()
    b.cancel()                                        # idempotent
    assert loop.pending() == [] and timers.pending() == 0


def test_a_failing_callback_does_not_starve_the_rest_of_its_slot():
    loop = VirtualLoop(start=0.0)
    timers = CoalescedTimers(loop)
    ran = []
    timers.call_at(1.0, lambda: 1 / 0)
    timers.call_at(1.0, lambda: ran.append("second"))
    loop.advance(2.0)
    assert ran == ["second"]


# ---- keepalive rounds in virtual time ---------------------------------------------------------

def test_ten_watches_wake_the_loop_once_per_keepalive_interval():
    """The regression this guards: a timer per tunnel (a liveness poll, a keepalive each on its
    own phase) shows here as more wake-ups than keepalive intervals."""
    engine = VirtualEngine()
    made, told = watches(engine, 10, interval=5.0, timeout=5.0)
    engine.loop.advance(60.0)
    assert engine.loop.wakeups == 12                  # 60 s / 5 s: rounds and their judgements together
    assert [t.keepalives for _, t in made] == [12] * 10 and [w.rounds for w, _ in made] == [12] * 10
    assert told == [] and engine.loop.executor_calls == 0


def test_an_unanswered_keepalive_is_told_once_as_silent_within_interval_plus_timeout():
    engine = VirtualEngine()
    made, told = watches(engine, 3, interval=5.0, timeout=5.0)
    start = engine.loop.now
    made[1][1].answering = False
    engine.loop.advance(next_on_grid(start, 5.0) - start + 5.0)   # the first round and its judgement
    assert told == [(1, "silent")]
    engine.loop.advance(30.0)
    assert told == [(1, "silent")]                    # told once; the others keep answering
    assert made[1][1].keepalives == 1 and made[0][1].keepalives > 1


def test_an_upstream_that_ends_is_told_at_once_as_died_and_its_rounds_stop():
    engine = VirtualEngine()
    made, told = watches(engine, 2)
    made[0][1].end()
    assert told == [(0, "died")]
    engine.loop.advance(30.0)
    assert made[0][1].keepalives == 0 and told == [(0, "died")]


def test_no_keepalive_interval_means_no_timer_at_all():
    """A transport whose upstream keeps itself alive (OpenSSH's master: ``ping_interval`` inf)."""
    engine = VirtualEngine()
    made, told = watches(engine, 10, interval=math.inf)
    assert engine.loop.pending() == []
    made[3][1].end()
    assert told == [(3, "died")]


def test_a_stopped_watch_sends_and_tells_nothing_more():
    engine = VirtualEngine()
    made, told = watches(engine, 1)
    made[0][0].stop()
    assert engine.loop.pending() == []
    made[0][1].end()
    assert told == []


# ---- ten real tunnels on one engine ----------------------------------------------------------

class LiveTransport(PingedTransport):
    """Channels are TCP connections to the greeting server (the probe passes)."""

    kind = "live"

    def __init__(self, port: int) -> None:
        super().__init__()
        self.port = port

    def open_channel(self, host, port, timeout):
        return socket.create_connection(("127.0.0.1", self.port), timeout=timeout)


class CountingLoopTimers:
    """Every timer put on an asyncio loop (``call_later`` goes through ``call_at``)."""

    def __init__(self, loop) -> None:
        self.loop = loop
        self.handles: list = []
        self._lock = threading.Lock()
        original = loop.call_at

        def call_at(when, callback, *args, **kw):
            handle = original(when, callback, *args, **kw)
            with self._lock:
                self.handles.append(handle)
            return handle
        loop.call_at = call_at

    def pending(self) -> int:
        now = self.loop.time()
        with self._lock:
            return sum(1 for h in self.handles if not h.cancelled() and h.when() > now)


def eventually(predicate, timeout: float = 20.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


@pytest.fixture
def engine():
    loop = EngineLoop("idle-test", workers=4)
    loop.start()
    yield loop
    loop.stop()


def test_ten_idle_tunnels_leave_no_step_and_no_timer_per_tunnel(engine):
    """Once up and proven, idle tunnels have no scheduled step, and the engine loop holds the
    keepalive grid's timers only (at most two slots: the next round and a judgement), not one
    per tunnel: a periodic poll per tunnel coming back fails this."""
    server = GreetingEchoServer()
    scheduler = Scheduler(SYSTEM_CLOCK)
    counting = CountingLoopTimers(engine.loop)
    driving = engine.submit(scheduler.drive(engine))
    settings = TunnelSettings(keepalive_interval=5.0, health_timeout=5.0, health_interval=30.0)
    tunnels = [Tunnel(f"t{i}", 0, "db.internal", 3306, LiveTransport(server.port), settings,
                      scheduler=scheduler, engine=engine) for i in range(10)]
    try:
        for t in tunnels:
            t.start()
        eventually(lambda: all(t.state == TunnelState.UP for t in tunnels), what="ten tunnels up")
        eventually(scheduler.idle, what="no step due (every tunnel proven)")
        assert counting.pending() <= 2, counting.pending()
        assert all(t.state == TunnelState.UP for t in tunnels)
        tunnels[4].transport.end()                    # the event still heals it: died -> rebuilt
        eventually(lambda: tunnels[4].status().reconnects == 1 and tunnels[4].state == TunnelState.UP,
                   what="an ended upstream rebuilt")
    finally:
        for t in tunnels:
            t.stop()
        driving.cancel()
        server.close()
