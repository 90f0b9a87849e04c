"""What every credential keeper shares: a lifecycle with one loop, a status, and events.

A ``Keeper`` owns one retry loop: ``run_once`` does whatever is due and returns the delay to its
next step; the loop waits that long on the injected ``Clock`` (or until ``wake``). Tests drive
``run_once`` in virtual time instead of starting the thread. ``CredentialEvent`` is what keepers
announce (never a secret); ``Tuning`` holds the engine knobs that are not user config.
"""

from __future__ import annotations

import logging
import math
import threading
from dataclasses import dataclass, replace
from typing import Any, Callable

from . import log as dlog
from .errors import DbtunneldError
from .model import CredentialState, CredentialStatus
from .timing import Backoff, Clock

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
    orphan_tries: int = 6               # revoke attempts for leases an earlier run left behind...
    orphan_window: float = 600.0        # ... within this long; the next start tries again


class Keeper:
    """A keeper with an explicit lifecycle: ``start`` spawns its loop, ``stop`` ends it."""

    kind = "keeper"

    def __init__(self, name: str, clock: Clock, emit: Callable[[CredentialEvent], None]) -> None:
        self.name = name
        self.clock = clock
        self._emit_event = emit
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._cond = threading.Condition()
        self._status = CredentialStatus(kind=self.kind, name=name, state=S.IDLE, since=clock.time())
        self.steps = 0

    # lifecycle
    def start(self, threaded: bool = True) -> None:
        if threaded and self._thread is None:
            self._thread = threading.Thread(target=self._loop, name=f"dbtunneld-{self.kind}-{self.name}", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stopping.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    def wake(self) -> None:
        self._wake.set()

    def woken(self) -> bool:
        """For a virtual-time driver: was this unit woken? (clears the flag)."""
        if self._wake.is_set():
            self._wake.clear()
            return True
        return False

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            try:
                delay = self.run_once()
            except Exception:  # a bug must not kill the keeper silently or spin
                log.exception("%s %s: unexpected error; retrying in 5 s", self.kind, self.name)
                delay = 5.0
            if self._stopping.is_set():
                break
            self.clock.wait(self._wake, max(0.0, delay))

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


def short_error(exc: BaseException) -> str:
    return dlog.mask(exc.one_line() if isinstance(exc, DbtunneldError) else f"{type(exc).__name__}: {exc}")


def finite(t: float | None) -> float | None:
    return None if t is None or math.isinf(t) else t
