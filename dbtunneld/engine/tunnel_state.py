"""A tunnel's state table and retry schedule: which moves are allowed (``TRANSITIONS``, guarded
by ``StateMachine``) and when to try again after a failure (``RetrySchedule``). Pure: no I/O,
time comes from the injected ``timing.Clock``."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

from ..core.config import TunnelSettings
from ..core.model import TunnelState
from ..core.timing import Backoff, Clock

S = TunnelState

TRANSITIONS: dict[TunnelState, frozenset[TunnelState]] = {
    S.STOPPED: frozenset({S.WAITING_CREDENTIALS, S.CONNECTING, S.FAILED}),
    S.WAITING_CREDENTIALS: frozenset({S.CONNECTING, S.RECONNECTING, S.BACKOFF, S.NEEDS_SIGN_IN,
                                      S.FAILED, S.STOPPED}),
    S.CONNECTING: frozenset({S.UP, S.BACKOFF, S.WAITING_CREDENTIALS, S.NEEDS_SIGN_IN, S.FAILED,
                             S.STOPPED}),
    S.UP: frozenset({S.RECONNECTING, S.BACKOFF, S.WAITING_CREDENTIALS, S.FAILED, S.STOPPED}),
    S.RECONNECTING: frozenset({S.UP, S.BACKOFF, S.WAITING_CREDENTIALS, S.NEEDS_SIGN_IN, S.FAILED,
                               S.STOPPED}),
    S.BACKOFF: frozenset({S.CONNECTING, S.RECONNECTING, S.WAITING_CREDENTIALS, S.NEEDS_SIGN_IN,
                          S.FAILED, S.STOPPED}),
    S.NEEDS_SIGN_IN: frozenset({S.WAITING_CREDENTIALS, S.CONNECTING, S.STOPPED}),
    S.FAILED: frozenset({S.WAITING_CREDENTIALS, S.CONNECTING, S.STOPPED}),
}

# moves a retry loop makes on every attempt: logged at DEBUG (the failure line says it all)
RETRY_CYCLE = {(S.BACKOFF, S.CONNECTING), (S.BACKOFF, S.RECONNECTING), (S.CONNECTING, S.BACKOFF),
               (S.RECONNECTING, S.BACKOFF)}


class IllegalMoveError(RuntimeError):
    """A programming error: a move the state table does not allow."""


@dataclass(frozen=True)
class Moment:
    """The state and what goes with it (shown in the status)."""

    state: TunnelState = S.STOPPED
    since: float | None = None
    last_error: str = ""
    hint: str = ""
    next_retry_at: float | None = None


class StateMachine:
    """The current ``Moment``; ``move`` accepts only the moves in ``TRANSITIONS``.

    Staying in the same state is not a move: it refreshes the details and keeps ``since``.
    """

    def __init__(self, clock: Clock, table: dict[TunnelState, frozenset[TunnelState]] = TRANSITIONS) -> None:
        self._clock = clock
        self._table = table
        self.now = Moment(since=clock.time())

    @property
    def state(self) -> TunnelState:
        return self.now.state

    def allowed(self, target: TunnelState) -> bool:
        return target == self.state or target in self._table[self.state]

    def move(self, target: TunnelState, *, error: str = "", hint: str = "",
             next_retry_at: float | None = None) -> Moment:
        if not self.allowed(target):
            raise IllegalMoveError(f"tunnel state {self.state.value} -> {target.value} is not allowed")
        since = self.now.since if target == self.state else self._clock.time()
        self.now = Moment(target, since, error, hint, next_retry_at)
        return self.now


class RetrySchedule:
    """When to try again: the first retry after losing an upstream that had proven itself (a
    health probe passed) is immediate, then ``timing.Backoff`` (initial, doubling, +-20 %
    jitter, capped). An upstream that connects but never proves itself counts as a failure,
    so a bastion that accepts and drops at once backs off instead of spinning."""

    def __init__(self, settings: TunnelSettings, rnd: Callable[[], float] = random.random) -> None:
        self._backoff = Backoff(initial=settings.backoff_initial, maximum=settings.backoff_max)
        self._rnd = rnd
        self.failures = 0
        self._proven = False

    def connected(self) -> None:
        self._proven = False

    def proven(self) -> None:
        self.failures = 0
        self._proven = True

    def immediate(self) -> bool:
        """After losing an upstream: retry at once only if it had proven itself."""
        return self._proven

    def failed(self) -> float:
        """Record a failure; the delay before the next attempt."""
        self._proven = False
        delay = self._backoff.delay(self.failures, self._rnd())
        self.failures += 1
        return delay
