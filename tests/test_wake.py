"""Sleep/wake detection on fake clocks."""

from __future__ import annotations

import math
import threading

from dbtunneld.core.timing import FakeClock
from dbtunneld.engine.scheduler import Scheduler
from dbtunneld.engine.wake import WakeDetector
from helpers.fakevault import run_schedule


class Clocks(FakeClock):
    """The engine's fake clock; a sleep (or a clock set) moves only the wall clock."""

    def __init__(self):
        super().__init__(1_700_000_000.0)

    def tick(self, seconds: float, slept: float = 0.0):
        self.advance(seconds)
        self.jump_wall(slept)


class Unit:
    def __init__(self):
        self.checks = 0
        self.checked = threading.Event()

    def check_now(self):
        self.checks += 1
        self.checked.set()


def detector(clocks: Clocks, **kw) -> WakeDetector:
    return WakeDetector(clock=clocks, threshold=10, **kw)


def test_normal_ticks_check_nothing():
    clocks, a = Clocks(), Unit()
    d = detector(clocks)
    d.register(a)
    for _ in range(100):
        clocks.tick(5, slept=0.2)          # small drift (NTP slew) is not a wake
        assert d.poll() is None
    assert a.checks == 0 and d.wakes == 0


def test_a_sleep_checks_every_unit_once():
    clocks, a, b = Clocks(), Unit(), Unit()
    d = detector(clocks)
    d.register(a)
    d.register(b)
    clocks.tick(5, slept=3600)
    assert d.poll() == 3600
    assert (a.checks, b.checks) == (1, 1)
    clocks.tick(5)
    assert d.poll() is None and a.checks == 1


def test_clock_set_backwards_also_checks():
    clocks, a = Clocks(), Unit()
    d = detector(clocks)
    d.register(a)
    clocks.tick(5, slept=-120)
    assert d.poll() == -120 and a.checks == 1


def test_unregistered_units_are_left_alone_and_failures_do_not_stop_others():
    clocks, a, b = Clocks(), Unit(), Unit()

    class Broken:
        def check_now(self):
            raise RuntimeError("boom")

    d = detector(clocks)
    for u in (Broken(), a, b):
        d.register(u)
    d.unregister(b)
    clocks.tick(5, slept=60)
    d.poll()
    assert a.checks == 1 and b.checks == 0


class Sleeper:
    """A scheduler unit that only steps when woken."""

    name = "sleeper"

    def __init__(self):
        self.steps = 0

    def step(self):
        self.steps += 1
        return math.inf


def test_the_detector_is_a_unit_of_the_scheduler_and_a_jump_wakes_every_unit():
    clocks, a, other = Clocks(), Unit(), Sleeper()
    sched = Scheduler(clocks)
    sched.add(other)
    d = detector(clocks, tick=5)
    d.register(a)
    d.start(sched)
    run_schedule(sched, clocks, 60)                  # 12 ticks, no jump
    assert a.checks == 0 and other.steps == 1 and d.running
    clocks.jump_wall(600)                            # the machine slept
    run_schedule(sched, clocks, 5)
    assert a.checks == 1 and other.steps == 2        # woken at once, not at its own (never) due time
    d.stop()
    assert d not in sched and not d.running
    assert not any(t.name == "wake-detector" for t in threading.enumerate())
