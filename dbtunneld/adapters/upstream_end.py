"""The one-shot "this upstream ended" notice every transport gives (``Transport.on_closed``).

One ``UpstreamEnd`` per upstream (an SSH connection, an ssh master, an SSM session): whoever sees
it end (paramiko's reader thread leaving, the master's reaper, the session's watcher, or ``close``)
calls ``end()``; each callback added before runs once then, on that thread; one added after runs
at once. Nothing polls: the tunnel learns of a dead upstream from this, not from a timer.
"""

from __future__ import annotations

import logging
import threading
from typing import Callable

log = logging.getLogger(__name__)

Callback = Callable[[], None]


class UpstreamEnd:
    """Callbacks to run once when one upstream ends. Thread-safe; ``end`` is idempotent."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._callbacks: list[Callback] = []
        self._ended = False

    @property
    def ended(self) -> bool:
        return self._ended

    def add(self, callback: Callback) -> None:
        """Run ``callback()`` when the upstream ends (now, on this thread, if it has)."""
        with self._lock:
            if not self._ended:
                self._callbacks.append(callback)
                return
        _run(callback)

    def discard(self, callback: Callback) -> None:
        with self._lock:
            if callback in self._callbacks:
                self._callbacks.remove(callback)

    def end(self) -> None:
        """The upstream is gone: run every callback once (the first call only)."""
        with self._lock:
            if self._ended:
                return
            self._ended = True
            callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            _run(callback)


def ended() -> UpstreamEnd:
    """An upstream end that has happened already (a transport with no upstream)."""
    end = UpstreamEnd()
    end.end()
    return end


def _run(callback: Callback) -> None:
    try:
        callback()
    except Exception:           # one listener's bug must not stop the others hearing of the end
        log.exception("upstream end listener %r failed", callback)
