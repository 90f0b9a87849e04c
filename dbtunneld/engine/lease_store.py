"""The leases file: ``LeaseRecord`` (what survives a crash: enough to revoke, nothing to log in
with) and ``LeaseStore`` (``paths.leases_file``, 0600, replaced atomically; written outside the
records' lock, newest snapshot last). Passwords never."""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import MISSING, asdict, dataclass, fields
from pathlib import Path

from ..core.paths import ProcessIdentity, pid_alive

log = logging.getLogger(__name__)

# Persisted lease records


@dataclass(frozen=True)
class LeaseRecord:
    """What survives a crash: enough to revoke, nothing to log in with."""

    lease_id: str
    cluster: str
    username: str
    vault: str
    pid: int
    issued_at: float
    owner_started: str = ""       # identity of the process ``pid`` (``paths.ProcessIdentity``): a
    owner_command: str = ""       # zombie or a reused pid is not the owner (empty in older files)

    def owner_alive(self) -> bool:
        """The process that holds this lease still runs (not a zombie, not another program)."""
        recorded = ProcessIdentity(self.owner_started, self.owner_command) if self.owner_started else None
        return pid_alive(self.pid, recorded)


class LeaseStore:
    """``leases.json`` (0600, replaced atomically): the leases this and earlier runs hold."""

    VERSION = 1

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()            # the records (never held across I/O)
        self._file = threading.Lock()            # the file: one writer at a time
        self._version = 0                        # snapshots taken (under ``_lock``)
        self._written = 0                        # the newest snapshot on disk (under ``_file``)
        self._records: dict[str, LeaseRecord] = {r.lease_id: r for r in self._read()}

    def _read(self) -> list[LeaseRecord]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s); leases it named expire on their own", self.path, exc)
            return []
        names = set(LeaseRecord.__dataclass_fields__)
        required = {f.name for f in fields(LeaseRecord) if f.default is MISSING}
        return [LeaseRecord(**{k: v for k, v in r.items() if k in names})
                for r in doc.get("leases", []) if isinstance(r, dict) and required <= set(r)]

    def records(self) -> list[LeaseRecord]:
        with self._lock:
            return list(self._records.values())

    def add(self, record: LeaseRecord) -> None:
        with self._lock:
            self._records[record.lease_id] = record
            snapshot = self._snapshot()
        self._write(*snapshot)

    def remove(self, lease_id: str) -> None:
        with self._lock:
            if self._records.pop(lease_id, None) is None:
                return
            snapshot = self._snapshot()
        self._write(*snapshot)

    def _snapshot(self) -> tuple[int, list[dict[str, object]]]:
        """Under ``_lock``: the records as written, numbered (a later change, a higher number)."""
        self._version += 1
        return self._version, [asdict(r) for r in self._records.values()]

    def _write(self, version: int, rows: list[dict[str, object]]) -> None:
        """Outside ``_lock`` (readers and other changes never wait for the disk): one writer at a
        time, and a snapshot older than the one on disk is skipped, so the file ends with the newest."""
        with self._file:
            if version <= self._written:
                return
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"version": self.VERSION, "leases": rows}, f, indent=1)
            os.replace(tmp, self.path)
            self._written = version



def orphans(records: list[LeaseRecord], me: int | None = None) -> list[LeaseRecord]:
    """Records no running process owns (a live other owner is another instance: leave it alone).
    A zombie owner (killed, not reaped yet) or a pid now used by another program owns nothing."""
    me = os.getpid() if me is None else me
    return [r for r in records if r.pid == me or not r.owner_alive()]
