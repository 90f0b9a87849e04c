"""What every credential keeper shares: a lifecycle with one loop, a status, and events.

A ``Keeper`` is a unit of the engine's ``scheduler.Scheduler``: ``step`` runs ``run_once``, which
does whatever is due and returns the delay to its next step. ``start(scheduler)`` adds it to the
schedule (production: driven on the engine loop, steps on its worker pool; tests: the same
``Scheduler`` in virtual time, ``tests/helpers/fakevault.run_virtual``), ``wake`` makes it due
now, ``stop`` removes it and waits (bounded) for a step in flight. A keeper owns no thread.

A bug (``errors.is_bug``: AttributeError, TypeError, KeyError... raised in the keeper or let
through by an adapter's classifier) is not a transient failure: ``step`` logs its traceback once
(per distinct bug), shows "internal error" in the status (state failed) and retries on a slow
schedule (``Tuning.bug_retry``: 30 s doubling to 10 min, back to 30 s only after 10 min without
it; the keeper does nothing else until the retry, wakes included), since a bug that depends
on what a server answered may pass, and a keeper that stopped for good would need a restart. ``CredentialEvent`` is what keepers
announce (never a secret); ``Tuning`` holds the engine knobs that are not user config.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Callable

from ..adapters import log as dlog
from ..core.errors import DbtunneldError
from ..core.model import CredentialState, CredentialStatus
from ..core.timing import Backoff, Clock

if TYPE_CHECKING:
    from .scheduler import Scheduler

log = logging.getLogger(__name__)

S = CredentialState


@dataclass(frozen=True)
class CredentialEvent:
    """Something a keeper announces: ``kind`` (see ``lease``), the credential's ``name`` and status."""

    kind: str
    name: str
    at: float
    status: CredentialStatus | None = None
    detail: str = ""


@dataclass(frozen=True)
class Tuning:
    """Engine knobs that are not user config (tests shorten them)."""

    backoff: Backoff = Backoff(initial=1.0, maximum=30.0)
    sign_in_recheck: float = 60.0       # re-read the SSO cache this often while sign-in is needed
    failed_recheck: float = 300.0       # retry after a permission / config failure this often
    relogin_ahead: float | None = None  # log in again this long before the token's max TTL
                                        # (default 1.5 x credentials.mint_ahead; clamped to 1/3 of its life)
    sso_poll_floor: float = 1.0
    bug_retry: Backoff = Backoff(initial=30.0, maximum=600.0)   # after an internal error (a bug)
    orphan_tries: int = 6               # revoke attempts for leases an earlier run left behind...
    orphan_window: float = 600.0        # ... within this long; the next start tries again


class Keeper:
    """A unit of the scheduler with an explicit lifecycle: ``start`` schedules it, ``stop`` ends it."""

    kind = "keeper"
    tuning = Tuning()     # subclasses set their own

    def __init__(self, name: str, clock: Clock, emit: Callable[[CredentialEvent], None]) -> None:
        self.name = name
        self.clock = clock
        self._emit_event = emit
        self._scheduler: Scheduler | None = None
        self._stopping = threading.Event()
        self._cond = threading.Condition()
        self._stepping_in: threading.Thread | None = None   # the worker running a step (under _cond)
        self._status = CredentialStatus(kind=self.kind, name=name, state=S.IDLE, since=clock.time())
        self.steps = 0
        self.internal_errors = 0
        self._bug_attempt = 0
        self._last_bug_at = 0.0
        self._paused_until = 0.0       # after a bug, nothing runs before this (wakes included)
        self._bugs_logged: set[tuple[str, str, int]] = set()

    # lifecycle
    def start(self, scheduler: "Scheduler") -> None:
        """Schedule the first step now (idempotent; a stopped keeper stays stopped)."""
        if self._scheduler is None and not self._stopping.is_set():
            self._scheduler = scheduler
            scheduler.add(self)

    def request_stop(self) -> None:
        """No more steps after the current one (returns at once; ``stop`` also waits)."""
        self._stopping.set()
        if self._scheduler is not None:
            self._scheduler.remove(self)

    def stop(self, timeout: float = 5.0) -> None:
        """``request_stop``, then wait up to ``timeout`` for a step in flight to end."""
        self.request_stop()
        with self._cond:
            if self._stepping_in is not threading.current_thread():
                self._cond.wait_for(lambda: self._stepping_in is None, max(0.0, timeout))

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wake(self) -> None:
        """Step now (right after the current step, if one runs); from any thread."""
        if self._scheduler is not None:
            self._scheduler.wake(self)

    def step(self) -> float:
        """``run_once``, with a bug turned into "internal error" and a slow retry (never a crash
        of the loop, never a fast spin); returns the delay to the next step."""
        with self._cond:
            self._stepping_in = threading.current_thread()
        try:
            return self._step()
        finally:
            with self._cond:
                self._stepping_in = None
                self._cond.notify_all()

    def _step(self) -> float:
        now = self.clock.time()
        if now < self._paused_until:
            return self._paused_until - now
        try:
            delay = self.run_once()
        except Exception as exc:
            return self._internal_error(exc)
        if self._bug_attempt and self.clock.time() - self._last_bug_at > self.tuning.bug_retry.maximum:
            self._bug_attempt = 0      # a long stretch without the bug: back to the first delay
        return delay

    def _internal_error(self, exc: Exception) -> float:
        self.internal_errors += 1
        self._last_bug_at = self.clock.time()
        delay = self.tuning.bug_retry.delay(self._bug_attempt, 0.5)
        self._bug_attempt += 1
        text = f"internal error: {type(exc).__name__}: {dlog.mask(str(exc))}"
        where = _origin(exc)
        if where not in self._bugs_logged:
            self._bugs_logged.add(where)
            log.error("%s %s: %s (a bug in dbtunneld; please report it with this traceback); retry in %.0f s",
                      self.kind, self.name, text, delay, exc_info=exc)
        else:
            log.warning("%s %s: the same %s again; retry %d in %.0f s", self.kind, self.name, text,
                        self._bug_attempt, delay)
        self._paused_until = self.clock.time() + delay
        self._set_status(state=S.FAILED, last_error=text + " (see the log)", next_action_at=self._paused_until)
        return delay

    def run_once(self) -> float:  # pragma: no cover - abstract
        raise NotImplementedError

    # status
    def status(self) -> CredentialStatus:
        with self._cond:
            return self._status

    def _set_status(self, **changes: Any) -> None:
        with self._cond:
            old = self._status
            if "state" in changes and changes["state"] != old.state:
                changes.setdefault("since", self.clock.time())
            new = replace(old, **changes)
            self._status = new
            self._cond.notify_all()
        if new.state != old.state:
            self._emit("status", new)

    def _emit(self, kind: str, status: CredentialStatus | None = None, detail: str = "") -> None:
        self._emit_event(CredentialEvent(kind, self.name, self.clock.time(), status or self.status(), detail))


def _origin(exc: BaseException) -> tuple[str, str, int]:
    """A bug's identity for "log its traceback once": its type and the line that raised it."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    code = tb.tb_frame.f_code if tb is not None else None
    return (type(exc).__name__, code.co_filename if code else "", tb.tb_lineno if tb is not None else 0)


def short_error(exc: BaseException) -> str:
    return dlog.mask(exc.one_line() if isinstance(exc, DbtunneldError) else f"{type(exc).__name__}: {exc}")


def finite(t: float | None) -> float | None:
    return None if t is None or math.isinf(t) else t
