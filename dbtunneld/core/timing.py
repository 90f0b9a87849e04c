"""Renewal and backoff maths for kept credentials (pure functions), and the injectable Clock.

The keepers in ``lease`` ask ``plan_next`` what to do next with a credential (renew it, or replace
it with a fresh one) and ``Backoff`` / ``retry_within`` how long to wait after a failure. The maths
follow Vault's LifetimeWatcher: renew after 2/3 of the remaining lifetime plus 1/3 of a jittered
grace (10-20 % of the granted TTL); when a renewal would land inside the grace (the server stopped
extending it), replace the credential; retries back off exponentially, bounded by what is left.

Loops never call ``time.sleep``: they wait on a ``Clock`` so tests drive them with ``FakeClock``.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass
from typing import Literal, Protocol

RENEW_FRACTION = 2.0 / 3.0
GRACE_MIN = 0.10
GRACE_MAX = 0.20
REPLACE_FRACTION = 1.0 / 3.0   # a replacement margin never exceeds this share of the lifetime
MIN_RETRY = 0.05               # no retry is scheduled closer than this: no busy loops


# ---------------------------------------------------------------------------------------------
# Clocks


class Clock(Protocol):
    """Wall-clock time (epoch seconds), a monotonic reading (intervals; it stops while the machine
    sleeps, so wall minus monotonic reveals a sleep) and an interruptible wait. The engine's one
    clock: keepers, the supervisor and the wake detector take it injected. (Bounds on a blocking
    call, such as a thread join or an HTTP timeout, are real time and use ``time.monotonic``.)"""

    def time(self) -> float: ...

    def monotonic(self) -> float: ...

    def wait(self, event: threading.Event, timeout: float) -> bool:
        """Block until ``event`` is set or ``timeout`` seconds passed; return ``event.is_set()``."""
        ...


class SystemClock:
    """The real clock."""

    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        if math.isinf(timeout):
            return event.wait()
        return event.wait(max(0.0, timeout))


SYSTEM_CLOCK = SystemClock()


class FakeClock:
    """A deterministic clock for tests.

    Manual mode (default): time moves only by ``advance``; ``wait`` blocks its caller until the
    fake time reaches the deadline or the event is set. ``wait_for_waiters`` tells a test that a
    loop has gone to sleep (an explicit readiness signal instead of a sleep).
    ``auto_advance=True``: ``wait`` jumps time to its deadline at once, so a loop run in the
    test's own thread goes through hours of schedule instantly. ``waits`` records every timeout.
    """

    def __init__(self, start: float = 1_000_000.0, *, auto_advance: bool = False) -> None:
        self._now = float(start)
        self._mono = 0.0
        self._auto = auto_advance
        self._cond = threading.Condition()
        self._waiters = 0
        self.waits: list[float] = []

    def time(self) -> float:
        with self._cond:
            return self._now

    def monotonic(self) -> float:
        with self._cond:
            return self._mono

    def advance(self, seconds: float) -> None:
        with self._cond:
            self._now += max(0.0, seconds)
            self._mono += max(0.0, seconds)
            self._cond.notify_all()

    def jump_wall(self, seconds: float) -> None:
        """The wall clock alone moves (the machine slept, or the clock was set); monotonic does not."""
        with self._cond:
            self._now += seconds
            self._cond.notify_all()

    def set(self, now: float) -> None:
        with self._cond:
            self._mono += max(0.0, now - self._now)
            self._now = max(self._now, now)
            self._cond.notify_all()

    def wait(self, event: threading.Event, timeout: float) -> bool:
        with self._cond:
            self.waits.append(timeout)
            deadline = self._now + max(0.0, timeout)
            if self._auto:
                if not event.is_set() and not math.isinf(deadline):
                    self._mono += max(0.0, deadline - self._now)
                    self._now = max(self._now, deadline)
                return event.is_set()
            self._waiters += 1
            self._cond.notify_all()
            try:
                while not event.is_set() and self._now < deadline:
                    self._cond.wait(0.005)
            finally:
                self._waiters -= 1
                self._cond.notify_all()
            return event.is_set()

    def wait_for_waiters(self, count: int = 1, timeout: float = 5.0) -> bool:
        """Block (real time, bounded) until at least ``count`` threads wait on this clock."""
        end = time.monotonic() + timeout
        with self._cond:
            while self._waiters < count:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True


# ---------------------------------------------------------------------------------------------
# Renewal maths


@dataclass(frozen=True)
class Lifetime:
    """What is known about one kept credential (token or lease), in epoch seconds."""

    issued_at: float
    expires_at: float                  # current expiry (math.inf: never expires)
    duration: float                    # TTL granted by the last acquire or renew
    renewable: bool = True
    max_expires_at: float | None = None  # known (or predicted) end of renewals

    def end(self) -> float | None:
        """When this credential surely stops: its max TTL, or its expiry if it cannot be renewed."""
        ends = [t for t in (self.max_expires_at,) if t is not None]
        if not self.renewable:
            ends.append(self.expires_at)
        return min(ends) if ends else None


@dataclass(frozen=True)
class Plan:
    """The next thing a keeper does with a credential: ``renew`` / ``replace`` at ``at``,
    or ``hold`` (nothing to do; ``at`` is infinite)."""

    action: Literal["renew", "replace", "hold"]
    at: float


def jittered_grace(duration: float, rnd: float) -> float:
    """The grace period: 10-20 % of the granted TTL, ``rnd`` in [0, 1) picks where."""
    rnd = min(max(rnd, 0.0), 1.0)
    return max(0.0, duration) * (GRACE_MIN + (GRACE_MAX - GRACE_MIN) * rnd)


def renew_delay(remaining: float, grace: float) -> float:
    """Wait this long before renewing: 2/3 of the remaining lifetime plus 1/3 of the grace."""
    return max(0.0, remaining) * RENEW_FRACTION + max(0.0, grace) / 3.0


def clamp_margin(margin: float, lifetime: float) -> float:
    """A replace-ahead margin, clamped to a third of the credential's whole lifetime.

    With TTLs of seconds a 10-minute margin would replace a credential as soon as it is issued;
    the clamp keeps two thirds of every lifetime in use.
    """
    return max(0.0, min(margin, max(0.0, lifetime) * REPLACE_FRACTION))


def replace_time(life: Lifetime, margin: float) -> float | None:
    """When to acquire a successor: ``margin`` (clamped) before the credential's end, if known."""
    end = life.end()
    if end is None or math.isinf(end):
        return None
    return end - clamp_margin(margin, end - life.issued_at)


def plan_next(now: float, life: Lifetime, grace: float, margin: float) -> Plan:
    """Renew at 2/3 of the remaining life (+ grace/3); replace once renewing stops paying off.

    Replacing is chosen when the credential's end is known and near (``margin`` before it), or
    when the next renewal would land inside the grace, which is what a capped renewal (max TTL
    near) looks like.
    """
    replace_at = replace_time(life, margin)
    if life.renewable and not math.isinf(life.expires_at):
        remaining = life.expires_at - now
        delay = renew_delay(remaining, grace)
        if remaining - delay > grace:
            renew_at = now + delay
            if replace_at is None or renew_at < replace_at:
                return Plan("renew", renew_at)
        elif replace_at is None:
            return Plan("replace", now)
    if replace_at is None:
        return Plan("hold", math.inf)
    if life.renewable:
        replace_at = min(replace_at, life.expires_at - grace)
    return Plan("replace", max(now, replace_at))


def renewal_capped(requested: float, granted: float, tolerance: float = 1.0) -> bool:
    """Did the server grant less than asked? Then it has reached the max TTL."""
    return granted + max(tolerance, 0.02 * requested) < requested


# ---------------------------------------------------------------------------------------------
# Backoff


@dataclass(frozen=True)
class Backoff:
    """Exponential backoff with +-``jitter`` spread: attempt 0 waits about ``initial``."""

    initial: float = 1.0
    maximum: float = 30.0
    multiplier: float = 2.0
    jitter: float = 0.2

    def delay(self, attempt: int, rnd: float = 0.5) -> float:
        rnd = min(max(rnd, 0.0), 1.0)
        exponent = min(max(attempt, 0), 64)
        base = min(self.maximum, self.initial * self.multiplier ** exponent)
        spread = 1.0 + self.jitter * (2.0 * rnd - 1.0)
        return max(MIN_RETRY, min(self.maximum, base * spread))


def retry_within(delay: float, now: float, expires_at: float, grace: float) -> float | None:
    """A renewal retry delay bounded by the credential's remaining life.

    Returns ``None`` when no retry fits before ``expires_at - grace``: the caller stops renewing
    and acquires a fresh credential instead.
    """
    deadline = expires_at - max(0.0, grace)
    room = deadline - now
    if room < MIN_RETRY:
        return None
    return max(MIN_RETRY, min(delay, room))
