"""Every dbtunneld daemon that uses a sandbox's home, found and stopped at the sandbox's end.

The demo daemon is stopped by its harness; a daemon the user started by hand in the sandbox
(after `dbtunneld stop`, or one `dbtunneld connect` started) is found two ways: the holder of
a daemon lock under the sandbox's folders (portable), and on Linux every process whose HOME or
DBTUNNELD_HOME lies in those folders and whose command line is dbtunneld's. Each is asked to
stop over its control socket (so it revokes its DB users while Vault still runs), then
SIGTERM, then SIGKILL, each bounded.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from pathlib import Path
from typing import Iterable

from ..core.paths import Paths, default_paths, process_identity

STOP_WAIT = 20.0


def lock_holder(paths: Paths) -> int | None:
    """The pid of a live daemon holding ``paths``' lock, if any."""
    try:
        fd = os.open(paths.lock_path, os.O_RDWR)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return None                       # nobody holds it
    except BlockingIOError:
        text = paths.lock_path.read_text().split()
        return int(text[0]) if text and text[0].isdigit() else None
    finally:
        os.close(fd)


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes()
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def _inside(path: str, roots: Iterable[Path]) -> bool:
    return any(path == str(r) or path.startswith(str(r) + "/") for r in roots)


def daemons_by_environment(roots: list[Path]) -> dict[int, Paths]:
    """Linux: dbtunneld processes whose HOME or DBTUNNELD_HOME is inside ``roots``, with their paths."""
    found: dict[int, Paths] = {}
    if not os.path.isdir("/proc/self"):
        return found
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        pid = int(entry)
        identity = process_identity(pid)
        if identity is None or "dbtunneld" not in identity.command or " daemon" not in identity.command:
            continue
        try:
            env = _environ(pid)
        except OSError:
            continue
        if _inside(env.get("HOME", ""), roots) or _inside(env.get("DBTUNNELD_HOME", ""), roots):
            found[pid] = default_paths(env)
    return found


def sandbox_daemons(roots: list[Path], candidates: list[Paths]) -> dict[int, Paths]:
    """Daemons using the sandbox: lock holders among ``candidates`` plus the environment scan."""
    found = daemons_by_environment(roots)
    for paths in candidates:
        pid = lock_holder(paths)
        if pid is not None:
            found.setdefault(pid, paths)
    return found


def stop_daemon(pid: int, paths: Paths, wait: float = STOP_WAIT) -> bool:
    """Ask it to stop (it revokes its leases), then SIGTERM, then SIGKILL. True: it stopped cleanly."""
    from ..process.client import Client

    identity = process_identity(pid)
    gone = lambda: process_identity(pid) != identity or identity is None  # noqa: E731
    try:
        Client(paths.socket_path, timeout=5).request("stop", timeout=5)
    except Exception:
        _signal(pid, signal.SIGTERM)
    if _wait(gone, wait):
        return True
    _signal(pid, signal.SIGKILL)
    _wait(gone, 5)
    return False


def _wait(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
