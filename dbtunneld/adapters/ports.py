"""Stable local ports: pinned in config or assigned once from a range and persisted.

Owns the ports file (``paths.ports_file``), binding listeners on 127.0.0.1 only, and naming
the process that holds a port when the bind fails (``PortInUseError``). A port is never moved
silently: once a cluster has a port, it keeps it until the user changes the config.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Iterable

from ..core.errors import NeedsUserError, PortInUseError

log = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
LISTEN_BACKLOG = 128
_FILE_VERSION = 1


class PortRangeExhaustedError(NeedsUserError):
    """Every port of tunnels.port_range is taken (by other clusters or other processes)."""

    def __init__(self, name: str, port_range: tuple[int, int]) -> None:
        lo, hi = port_range
        super().__init__(f'cluster "{name}": no free port left in tunnels.port_range [{lo}, {hi}]',
                         hint="widen tunnels.port_range or pin local_port for this cluster in config.toml")


class PortBook:
    """The persisted cluster -> port assignments (a small JSON file, written atomically)."""

    def __init__(self, path: Path, port_range: tuple[int, int]) -> None:
        self.path = Path(path)
        self.port_range = port_range
        self._lock = threading.Lock()

    def assignments(self) -> dict[str, int]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as exc:
            log.warning("ports file %s is unreadable (%s); assigned ports start afresh", self.path, exc)
            return {}
        ports = data.get("ports", {}) if isinstance(data, dict) else {}
        return {str(k): int(v) for k, v in ports.items() if isinstance(v, int)}

    def port_for(self, name: str, pinned: int | None = None, reserved: Iterable[int] = ()) -> int:
        """The cluster's port: the pinned one, else its persisted one, else a new free one.

        ``reserved`` are ports pinned by other clusters in the config (never handed out).
        """
        if pinned is not None:
            return pinned
        with self._lock:
            book = self.assignments()
            if name in book:
                return book[name]
            port = self._first_free(name, set(reserved) | set(book.values()))
            book[name] = port
            self._write(book)
            log.info('cluster "%s": assigned local port %d (kept from now on)', name, port)
            return port

    def keep(self, name: str, port: int) -> None:
        """Record ``port`` for ``name`` unless it has one already (a catalog's first proposal)."""
        with self._lock:
            book = self.assignments()
            if name not in book:
                book[name] = port
                self._write(book)
                log.info('cluster "%s": local port %d (from the catalog; kept from now on)', name, port)

    def forget(self, name: str) -> None:
        with self._lock:
            book = self.assignments()
            if book.pop(name, None) is not None:
                self._write(book)

    def _first_free(self, name: str, taken: set[int]) -> int:
        lo, hi = self.port_range
        for port in range(lo, hi + 1):
            if port not in taken and port_is_free(port):
                return port
        raise PortRangeExhaustedError(name, self.port_range)

    def _write(self, book: dict[str, int]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        text = json.dumps({"version": _FILE_VERSION, "ports": dict(sorted(book.items()))}, indent=2)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".ports-", suffix=".json")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text + "\n")
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def port_is_free(port: int) -> bool:
    try:
        bind_listener(port).close()
        return True
    except PortInUseError:
        return False


def bind_listener(port: int, backlog: int = LISTEN_BACKLOG) -> socket.socket:
    """A listening socket on 127.0.0.1:port; PortInUseError names the holder when the OS tells."""
    if sys.platform == "darwin" and _something_listens(port):
        raise PortInUseError(port, find_holder(port))
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        _set_reuse(sock)
        sock.bind((LOOPBACK, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.EADDRINUSE, errno.EACCES, getattr(errno, "WSAEADDRINUSE", -1)):
            raise PortInUseError(port, find_holder(port)) from None
        raise
    return sock


def _set_reuse(sock: socket.socket) -> None:
    # Linux: SO_REUSEADDR only skips TIME_WAIT leftovers; it never lets two listeners share a
    # port. Windows needs SO_EXCLUSIVEADDRUSE for that guarantee instead.
    if sys.platform.startswith("win"):
        sock.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_EXCLUSIVEADDRUSE", 0), 1)
    else:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)


def _something_listens(port: int) -> bool:
    # On BSD/macOS SO_REUSEADDR lets 127.0.0.1:P bind beside another process's *:P; check first.
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


def find_holder(port: int) -> str:
    """'pid 1234 (python3 -m http.server)' for the process listening on the port, or ''."""
    try:
        if sys.platform.startswith("linux"):
            return _linux_holder(port)
        if shutil.which("lsof"):
            return _lsof_holder(port)
    except OSError as exc:
        log.debug("cannot tell who holds port %d: %s", port, exc)
    return ""


def _linux_holder(port: int) -> str:
    inodes = _listening_inodes(port)
    if not inodes:
        return ""
    for pid in _pids():
        if _pid_has_socket(pid, inodes):
            return _describe_pid(pid)
    return ""


def _listening_inodes(port: int) -> set[str]:
    inodes: set[str] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:
                inodes.add(inode)
    return inodes


def _pids() -> list[int]:
    return sorted(int(p) for p in os.listdir("/proc") if p.isdigit())


def _pid_has_socket(pid: int, inodes: set[str]) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return False
    for fd in fds:
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
        except OSError:
            continue
        if target.startswith("socket:[") and target[8:-1] in inodes:
            return True
    return False


def _describe_pid(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        raw = b""
    command = " ".join(a.decode(errors="replace") for a in raw.split(b"\0") if a)
    return f"pid {pid} ({_short(command)})" if command else f"pid {pid}"


def _lsof_holder(port: int) -> str:
    try:
        out = subprocess.run(["lsof", "-nP", f"-iTCP:{port}", "-sTCP:LISTEN", "-Fpc"],
                             capture_output=True, text=True, timeout=5).stdout
    except (OSError, subprocess.TimeoutExpired):
        return ""
    pid = command = ""
    for line in out.splitlines():
        if line.startswith("p") and not pid:
            pid = line[1:]
        elif line.startswith("c") and not command:
            command = line[1:]
    return f"pid {pid} ({command})" if pid and command else (f"pid {pid}" if pid else "")


def _short(command: str, limit: int = 80) -> str:
    return command if len(command) <= limit else command[: limit - 3] + "..."
