"""The clusters the user wants connected, kept across restarts (a crash, a reboot, a quit).

``wanted.json`` in the state directory (0600, replaced atomically) lists the cluster names the
user connected and has not disconnected since; the supervisor adds on ``connect``, removes on
``disconnect`` (and when a reload drops the cluster), and connects them again at start, together
with the ``autoconnect`` ones. Names only: nothing in it logs in to anything.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from pathlib import Path
from typing import Callable, Iterable

log = logging.getLogger(__name__)


class WantedSet:
    """The persisted set of wanted cluster names (thread-safe)."""

    VERSION = 1

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._names: set[str] = self._read()

    def _read(self) -> set[str]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return set()
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s); connect the clusters you want again", self.path, exc)
            return set()
        names = doc.get("clusters", []) if isinstance(doc, dict) else []
        return {n for n in names if isinstance(n, str)}

    def names(self) -> set[str]:
        with self._lock:
            return set(self._names)

    def add(self, names: Iterable[str]) -> None:
        self._change(lambda s: s | set(names))

    def discard(self, names: Iterable[str]) -> None:
        self._change(lambda s: s - set(names))

    def keep_only(self, names: Iterable[str]) -> None:
        """Forget clusters the config no longer has."""
        self._change(lambda s: s & set(names))

    def _change(self, how: Callable[[set[str]], set[str]]) -> None:
        with self._lock:
            new = how(self._names)
            if new != self._names:
                self._names = new
                self._write()

    def _write(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": self.VERSION, "clusters": sorted(self._names)}, f)
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("cannot save the connected clusters to %s (%s); after a restart connect them again",
                        self.path, exc)
