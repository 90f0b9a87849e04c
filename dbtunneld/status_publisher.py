"""``StatusPublisher``: sends a ``status`` event whenever the daemon's status snapshot changes
(on a poke from a unit, or at least every ``STATUS_POLL`` seconds)."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

CHANGE_RECHECK = 0.5              # waiters re-read the status at least this often
STATUS_POLL = 5.0                 # fallback re-read of the status; units poke the publisher on every change

class StatusPublisher:
    """Publishes ``status`` events when the snapshot changes: on a poke, or at least every STATUS_POLL s."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], emit: Callable[[str, Any], None],
                 interval: float = STATUS_POLL) -> None:
        self._snapshot = snapshot
        self._emit = emit
        self._interval = interval
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._last: dict[str, Any] | None = None
        self._changed = threading.Condition()
        self.changes = 0                  # counts pokes: waiters compare it (``wait_change``)
        self._thread = threading.Thread(target=self._run, name="status-publisher", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def poke(self) -> None:
        """A unit changed: publish soon, and wake whoever waits for a change."""
        with self._changed:
            self.changes += 1
            self._changed.notify_all()
        self._wake.set()

    def wait_change(self, seen: int, timeout: float) -> bool:
        """Wait until a poke after ``seen`` (a ``changes`` value), at most ``timeout`` s (capped at
        ``CHANGE_RECHECK``, so a state that changed without a poke is still seen); True on a poke."""
        with self._changed:
            return self._changed.wait_for(lambda: self.changes != seen, max(0.0, min(timeout, CHANGE_RECHECK)))

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stopped.is_set():
                return
            self.publish_if_changed()

    def publish_if_changed(self) -> None:
        try:
            snap = self._snapshot()
        except Exception:
            log.exception("status snapshot failed")
            return
        if snap != self._last:
            self._last = snap
            self._emit("status", snap)
