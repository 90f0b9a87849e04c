"""The engine's schedule: due times, wakes (also during a step), and the loop driver."""

from __future__ import annotations

import math
import threading
import time

from dbtunneld.core.timing import FakeClock, SystemClock
from dbtunneld.engine.engine_loop import EngineLoop
from dbtunneld.engine.scheduler import Scheduler


class Unit:
    def __init__(self, name, delays, clock=None, block=None):
        self.name = name
        self.delays = list(delays)
        self.steps = []
        self.clock = clock
        self.block = block
        self.stepped = threading.Event()

    def step(self):
        self.steps.append(self.clock.monotonic() if self.clock else time.monotonic())
        self.stepped.set()
        if self.block is not None:
            self.block.wait(10)
        return self.delays.pop(0) if self.delays else math.inf


def run_schedule(scheduler, clock, seconds):
    end = clock.monotonic() + seconds
    while True:
        due = scheduler.take_due()
        for unit in due:
            scheduler.stepped(unit, unit.step())
        if due:
            continue
        nxt = scheduler.next_due()
        if nxt > end:
            clock.advance(end - clock.monotonic())
            return
        clock.advance(nxt - clock.monotonic())


def test_units_step_at_their_delays_in_virtual_time():
    clock = FakeClock()
    sched = Scheduler(clock)
    a, b = Unit("a", [10, 10, 10], clock), Unit("b", [25], clock)
    sched.add(a)
    sched.add(b, delay=5)
    run_schedule(sched, clock, 60)
    assert a.steps == [0, 10, 20, 30]
    assert b.steps == [5, 30]


def test_a_wake_makes_a_unit_due_now_and_a_wake_during_a_step_is_kept():
    clock = FakeClock()
    sched = Scheduler(clock)
    unit = Unit("u", [100, 100], clock)
    sched.add(unit)
    assert sched.take_due() == [unit]
    sched.wake(unit)                        # arrives while it steps
    sched.stepped(unit, unit.step())
    assert sched.next_due() == clock.monotonic()   # not 100 s later
    assert sched.take_due() == [unit]
    sched.stepped(unit, 100)
    clock.advance(3)
    sched.wake(unit)
    assert sched.take_due() == [unit]


def test_removed_units_are_not_rescheduled_and_bad_delays_do_not_spin():
    clock = FakeClock()
    sched = Scheduler(clock)
    unit = Unit("u", [], clock)
    sched.add(unit)
    assert sched.take_due() == [unit]
    sched.remove(unit)
    sched.stepped(unit, 1)
    assert unit not in sched and sched.next_due() == math.inf
    other = Unit("o", [], clock)
    sched.add(other)
    sched.take_due()
    sched.stepped(other, float("nan"))
    assert sched.next_due() == clock.monotonic() + 1.0


def test_the_loop_driver_steps_on_the_pool_and_never_overlaps_a_unit():
    release = threading.Event()
    clock = SystemClock()
    sched = Scheduler(clock)
    slow = Unit("slow", [0, 0, 0], block=release)
    quick = Unit("quick", [0.05] * 1000)
    with EngineLoop() as engine:
        task = engine.submit(sched.drive(engine))
        sched.add(slow)
        sched.add(quick)
        assert slow.stepped.wait(5)
        time.sleep(0.5)                     # the slow step blocks a worker, not the loop or others
        assert len(slow.steps) == 1          # never overlapped by a second step
        assert len(quick.steps) >= 3
        slow.stepped.clear()
        sched.wake(slow)
        release.set()
        assert slow.stepped.wait(5)
        quiet = Unit("quiet", [])
        sched.add(quiet)
        assert quiet.stepped.wait(5)
        time.sleep(0.3)
        assert len(quiet.steps) == 1        # inf: it sleeps until woken
        quiet.stepped.clear()
        sched.wake(quiet)
        assert quiet.stepped.wait(5)
        task.cancel()
