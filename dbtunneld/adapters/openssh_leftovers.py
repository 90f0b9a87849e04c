"""``ssh -M`` masters an earlier life of the daemon left running, and the records that find them.

A master runs in a session of its own (``start_new_session``), so a daemon killed with SIGKILL
leaves it logged in to the bastion. Each master the daemon starts is recorded in
``<runtime dir>/ssh-masters/<pid>.json`` (the runtime dir is private, 0700): the master's pid and
identity (start time + command line, ``core.paths.ProcessIdentity``), its control folder, and the
daemon's own pid and identity. At the next start ``end_leftover_masters`` stops, by pid, each
recorded master whose daemon is gone and which is still the very process recorded (a reused pid
or any other ssh is never touched), then removes its control folder and its record.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..core.paths import ProcessIdentity, my_identity, pid_alive, process_identity

log = logging.getLogger(__name__)

RECORDS = "ssh-masters"
STOP_WAIT = 3.0


@dataclass(frozen=True)
class MasterRecord:
    pid: int
    started: str
    command: str
    control_dir: str
    owner_pid: int
    owner_started: str
    owner_command: str

    def identity(self) -> ProcessIdentity:
        return ProcessIdentity(self.started, self.command)

    def owner_alive(self) -> bool:
        return pid_alive(self.owner_pid, ProcessIdentity(self.owner_started, self.owner_command))

    def is_leftover(self, me: int) -> bool:
        """Still the recorded ssh process, and no live daemon owns it."""
        if self.owner_pid == me or self.owner_alive():
            return False
        now = process_identity(self.pid)
        return (now is not None and bool(self.started) and now == self.identity()
                and "ControlMaster=yes" in now.command)


def records_dir(runtime_dir: Path) -> Path:
    return Path(runtime_dir) / RECORDS


def record_master(runtime_dir: Path, pid: int, control_dir: Path) -> Path | None:
    """Write the record of a master just started (None when it exited before it could be read)."""
    identity = process_identity(pid)
    if identity is None:
        return None
    me = my_identity()
    record = MasterRecord(pid, identity.started, identity.command, str(control_dir),
                          os.getpid(), me.started, me.command)
    folder = records_dir(runtime_dir)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    path = folder / f"{pid}.json"
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(asdict(record), f)
    os.replace(tmp, path)
    return path


def forget_master(path: Path | None) -> None:
    if path is not None:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def read_records(runtime_dir: Path) -> list[tuple[Path, MasterRecord]]:
    found = []
    for path in sorted(records_dir(runtime_dir).glob("*.json")):
        try:
            found.append((path, MasterRecord(**json.loads(path.read_text()))))
        except (OSError, ValueError, TypeError) as exc:
            log.warning("ignoring unreadable %s (%s)", path, exc)
    return found


def end_leftover_masters(runtime_dir: Path, me: int | None = None) -> list[int]:
    """Stop the masters an earlier, now dead, daemon left (SIGTERM, then SIGKILL after a bound);
    drop the records of masters that are gone. The pids stopped."""
    me = os.getpid() if me is None else me
    doomed: list[tuple[Path, MasterRecord]] = []
    for path, record in read_records(runtime_dir):
        if record.owner_pid == me or record.owner_alive():
            continue                                   # a live daemon's master: not ours to end
        if record.is_leftover(me):
            doomed.append((path, record))
        else:
            _drop(path, record)                         # gone already (or the pid is another process now)
    for _, record in doomed:
        log.warning("stopping ssh master pid %d left by an earlier daemon (pid %d)", record.pid, record.owner_pid)
        _signal(record, signal.SIGTERM)
    for r in _still_running([r for _, r in doomed], STOP_WAIT):
        _signal(r, signal.SIGKILL)
    for path, record in doomed:
        _drop(path, record)
    return [r.pid for _, r in doomed]


def _signal(record: MasterRecord, sig: int) -> None:
    if process_identity(record.pid) == record.identity():     # checked again just before
        try:
            os.kill(record.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _still_running(records: list[MasterRecord], timeout: float) -> list[MasterRecord]:
    """Those still running after up to ``timeout`` (they are not our children: polled by identity)."""
    deadline = time.monotonic() + timeout
    while True:
        left = [r for r in records if pid_alive(r.pid, r.identity())]
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.05)


def _drop(path: Path, record: MasterRecord) -> None:
    folder = Path(record.control_dir)
    if folder.name.startswith("ssh-"):            # the master's own mkdtemp folder, nothing else
        shutil.rmtree(folder, ignore_errors=True)
    forget_master(path)
