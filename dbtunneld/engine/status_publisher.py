"""``StatusPublisher``: sends a ``status`` event whenever the daemon's status snapshot changes
(on a poke from a unit, or at least every ``STATUS_POLL`` seconds). It is a task on the engine
loop; the snapshot (immutable ``model`` values, built by the supervisor without holding a lock
across I/O) is taken on the loop's worker pool, since reading the SSO cache touches the disk."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from typing import TYPE_CHECKING, Any, Callable

if TYPE_CHECKING:
    from .engine_loop import EngineLoop

log = logging.getLogger(__name__)

CHANGE_RECHECK = 0.5              # waiters re-read the status at least this often
# fallback re-read of the status (what changes without a poke: the SSO cache written by another
# process); units poke the publisher on every change. Each re-read wakes the loop and a worker,
# so it is rare (issue 17: idle wake-ups).
STATUS_POLL = 30.0
SNAPSHOT_TIMEOUT = 30.0           # a snapshot that takes longer is logged and skipped


class StatusPublisher:
    """Publishes ``status`` events when the snapshot changes: on a poke, or at least every STATUS_POLL s."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], emit: Callable[[str, Any], None],
                 interval: float = STATUS_POLL) -> None:
        self._snapshot = snapshot
        self._emit = emit
        self._interval = interval
        self._engine: EngineLoop | None = None
        self._poked: asyncio.Event | None = None
        self._task: concurrent.futures.Future[None] | None = None
        self._last: dict[str, Any] | None = None
        self._changed = threading.Condition()
        self.changes = 0                  # counts pokes: waiters compare it (``wait_change``)

    def start(self, engine: "EngineLoop") -> None:
        if self._task is None:
            self._poked = asyncio.Event()     # binds to the loop on first use (there)
            self._engine = engine
            self._task = engine.submit(self._run(engine))

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def poke(self) -> None:
        """A unit changed: publish soon, and wake whoever waits for a change (from any thread)."""
        with self._changed:
            self.changes += 1
            self._changed.notify_all()
        if self._engine is not None:
            self._engine.call(self._set_poked)

    def _set_poked(self) -> None:
        if self._poked is not None:
            self._poked.set()

    def wait_change(self, seen: int, timeout: float) -> bool:
        """Wait until a poke after ``seen`` (a ``changes`` value), at most ``timeout`` s (capped at
        ``CHANGE_RECHECK``, so a state that changed without a poke is still seen); True on a poke."""
        with self._changed:
            return self._changed.wait_for(lambda: self.changes != seen, max(0.0, min(timeout, CHANGE_RECHECK)))

    def stop(self, timeout: float = 5.0) -> None:
        """Cancel the task and wait (bounded) for it to end. Idempotent."""
        task = self._task
        if task is None or task.done():
            return
        task.cancel()
        concurrent.futures.wait([task], timeout)

    async def _run(self, engine: "EngineLoop") -> None:
        poked = self._poked or asyncio.Event()
        while True:
            poked.clear()
            try:
                await engine.run_blocking(self.publish_if_changed, timeout=SNAPSHOT_TIMEOUT)
            except asyncio.TimeoutError:
                log.warning("the status snapshot took over %.0f s; skipped", SNAPSHOT_TIMEOUT)
            try:
                await asyncio.wait_for(poked.wait(), self._interval)
            except asyncio.TimeoutError:
                pass

    def publish_if_changed(self) -> None:
        try:
            snap = self._snapshot()
        except Exception:
            log.exception("status snapshot failed")
            return
        if snap != self._last:
            self._last = snap
            self._emit("status", snap)
