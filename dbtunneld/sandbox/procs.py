"""A small process manager for the sandbox stack: one ``Service`` per server process.

Each service runs in its own process group (``start_new_session``), logs stdout+stderr to
its own file, is recorded by pid and stopped by pid: SIGTERM to the group and to every
descendant, then SIGKILL after a bound. Readiness is polled with a deadline, never guessed
with a sleep. Tests use the fault methods (``kill``, ``freeze``/``thaw``, ``restart``) to
crash, hang or bounce a server; a restarted service comes back on the same port.

Linux-only (it reads ``/proc`` to find descendants, e.g. sshd's per-connection children,
which call ``setsid`` and so leave the group).
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

_reserved_ports: set[int] = set()
_reserved_lock = threading.Lock()


class ServiceError(RuntimeError):
    """A sandbox service failed; ``log_tail`` holds the end of its log."""

    def __init__(self, name: str, message: str, log_tail: str = "") -> None:
        self.name = name
        self.log_tail = log_tail
        text = f"sandbox service {name!r}: {message}"
        if log_tail:
            text += f"\n--- last lines of {name}'s log ---\n{log_tail}"
        super().__init__(text)


class StartError(ServiceError):
    """A service did not become ready (exited, or its readiness probe timed out)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A free TCP port on ``host``, never handed out twice by this process."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        with _reserved_lock:
            if port not in _reserved_ports:
                _reserved_ports.add(port)
                return port
    raise OSError(errno.EADDRINUSE, "no free loopback port found")


# ---------------------------------------------------------------- readiness probes

def tcp_probe(port: int, host: str = "127.0.0.1") -> Callable[[], bool]:
    """Ready when a TCP connect succeeds."""
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            return False
    return probe


def banner_probe(port: int, first: bytes = b"", host: str = "127.0.0.1") -> Callable[[], bool]:
    """Ready when the server sends a first packet (optionally starting with ``first``)."""
    def probe() -> bool:
        try:
            with socket.create_connection((host, port), timeout=0.5) as s:
                s.settimeout(1.0)
                data = s.recv(64)
                return bool(data) and data.startswith(first)
        except OSError:
            return False
    return probe


def http_probe(url: str, statuses: tuple[int, ...] = (200,)) -> Callable[[], bool]:
    """Ready when GET ``url`` answers with one of ``statuses``."""
    def probe() -> bool:
        try:
            with urllib.request.urlopen(url, timeout=1.0) as resp:
                return resp.status in statuses
        except urllib.error.HTTPError as exc:
            return exc.code in statuses
        except (OSError, ValueError):
            return False
    return probe


def file_probe(path: Path) -> Callable[[], bool]:
    """Ready when ``path`` exists (write it atomically: temp file + rename)."""
    return lambda: Path(path).exists()


def wait_until(check: Callable[[], bool], timeout: float, interval: float = 0.02,
               alive: Callable[[], bool] | None = None) -> bool:
    """Poll ``check`` until it is true or ``timeout`` passes (or ``alive`` turns false)."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return True
        if alive is not None and not alive():
            return check()
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
        interval = min(interval * 1.5, 0.2)


# ---------------------------------------------------------------- /proc helpers

def _proc_stat(pid: int) -> tuple[str, int, int] | None:
    """(state, ppid, pgid) of ``pid``, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    fields = raw[raw.rindex(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def pid_alive(pid: int) -> bool:
    """True if ``pid`` exists and is not a zombie."""
    stat = _proc_stat(pid)
    return stat is not None and stat[0] not in ("Z", "X")


def descendants(pid: int) -> list[int]:
    """Every live descendant of ``pid`` (children, grandchildren, ...)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None:
                children.setdefault(stat[1], []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return [p for p in out if pid_alive(p)]


def group_members(pgid: int) -> list[int]:
    """Live processes whose process group is ``pgid``."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _proc_stat(int(entry))
            if stat is not None and stat[2] == pgid and stat[0] not in ("Z", "X"):
                out.append(int(entry))
    return out


def processes_using(directory: Path) -> list[int]:
    """Live pids whose command line mentions ``directory`` or whose cwd is inside it."""
    prefix = str(directory)
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(f"/proc/{entry}/cwd")
        except OSError:
            continue
        if (prefix in cmdline or cwd == prefix or cwd.startswith(prefix + "/")) and pid_alive(int(entry)):
            found.append(int(entry))
    return found


def _signal_pids(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------- the service

@dataclass
class Service:
    """One server process of the stack.

    ``argv``/``env``/``cwd`` say how to run it; ``ready`` is a probe polled until it is
    true (bounded by ``start_timeout``); ``after_start`` runs after every successful start
    (e.g. to configure a server that keeps its state in memory). ``port`` is informational
    (the port the service listens on; it stays the same across restarts).

    Fault methods for tests: ``kill()`` (SIGKILL: a crash), ``freeze()``/``thaw()``
    (SIGSTOP/SIGCONT: a hang, connections are accepted by the kernel but never answered),
    ``stop()``/``start()`` (down and up again on the same port), ``restart()``.
    """

    name: str
    argv: list[str]
    log_path: Path
    ready: Callable[[], bool] = lambda: True
    env: dict[str, str] | None = None
    cwd: Path | None = None
    port: int | None = None
    start_timeout: float = 20.0
    stop_timeout: float = 5.0
    after_start: Callable[["Service"], None] | None = None
    before_start: Callable[["Service"], None] | None = None
    proc: subprocess.Popen | None = field(default=None, repr=False)
    started_at: float | None = None
    starts: int = 0
    frozen: bool = False

    # -- state

    @property
    def pid(self) -> int | None:
        """Pid of the running process (also its process group id), or None."""
        return self.proc.pid if self.proc is not None else None

    def is_running(self) -> bool:
        """True while the main process lives (a frozen process counts as running)."""
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        """The main pid, its process group and every descendant that is still alive."""
        if self.proc is None:
            return []
        found = {self.proc.pid} if pid_alive(self.proc.pid) else set()
        found.update(group_members(self.proc.pid))
        found.update(descendants(self.proc.pid))
        return sorted(found)

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of the service's log (empty if there is none)."""
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - 16384))
                data = f.read().decode("utf-8", "replace")
        except FileNotFoundError:
            return ""
        return "\n".join(data.splitlines()[-lines:])

    def to_json(self) -> dict:
        return {"name": self.name, "pid": self.pid, "port": self.port, "running": self.is_running(),
                "frozen": self.frozen, "log": str(self.log_path), "starts": self.starts}

    # -- lifecycle

    def spawn(self) -> None:
        """Start the process without waiting for readiness (see ``wait_ready``)."""
        if self.is_running():
            raise ServiceError(self.name, f"already running (pid {self.pid})")
        if self.before_start is not None:
            self.before_start(self)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as logf:
            logf.write(f"--- {time.strftime('%H:%M:%S')} starting: {' '.join(self.argv)}\n".encode())
            logf.flush()
            self.proc = subprocess.Popen(
                self.argv, stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                env=self.env, cwd=self.cwd, start_new_session=True, close_fds=True)
        self.frozen = False
        self.started_at = time.monotonic()
        self.starts += 1
        log.info("%s: started pid %s", self.name, self.proc.pid)

    def wait_ready(self, timeout: float | None = None) -> None:
        """Poll the readiness probe; on failure stop the process and raise StartError."""
        ok = wait_until(self.ready, self.start_timeout if timeout is None else timeout,
                        alive=self.is_running)
        if not ok or not self.is_running():
            why = (f"exited with status {self.proc.returncode} before it was ready"
                   if self.proc is not None and self.proc.poll() is not None
                   else f"not ready after {self.start_timeout:g}s")
            self.stop()
            raise StartError(self.name, why, self.log_tail())
        if self.after_start is not None:
            try:
                self.after_start(self)
            except Exception as exc:
                self.stop()
                raise StartError(self.name, f"set-up after start failed: {exc}", self.log_tail()) from exc
        log.info("%s: ready (pid %s, port %s, %.2fs)", self.name, self.pid, self.port,
                 time.monotonic() - (self.started_at or 0))

    def start(self, timeout: float | None = None) -> "Service":
        """Start and wait until ready; raises StartError with the log tail on failure."""
        self.spawn()
        self.wait_ready(timeout)
        return self

    def stop(self, timeout: float | None = None) -> None:
        """SIGTERM the group and descendants, SIGKILL what is left after ``timeout``.

        Idempotent; safe on a frozen service (it is continued so it can exit).
        """
        if self.proc is None:
            return
        targets = self.pids()
        if targets:
            self._signal(targets, signal.SIGTERM)
            self._signal(targets, signal.SIGCONT)
            if not self._wait_gone(targets, self.stop_timeout if timeout is None else timeout):
                log.warning("%s: still alive after SIGTERM, sending SIGKILL", self.name)
                self._signal(self.pids() or targets, signal.SIGKILL)
                self._wait_gone(targets, 5.0)
        self._reap()
        self.frozen = False
        log.info("%s: stopped", self.name)

    def kill(self) -> None:
        """Crash the service: SIGKILL to the group and every descendant, at once."""
        if self.proc is None:
            return
        targets = self.pids()
        self._signal(targets, signal.SIGKILL)
        self._wait_gone(targets, 5.0)
        self._reap()
        self.frozen = False
        log.info("%s: killed", self.name)

    def freeze(self) -> None:
        """Hang the service (SIGSTOP): its port stays open but nothing answers."""
        self._signal(self.pids(), signal.SIGSTOP)
        self.frozen = True
        log.info("%s: frozen", self.name)

    def thaw(self) -> None:
        """Undo ``freeze`` (SIGCONT)."""
        self._signal(self.pids(), signal.SIGCONT)
        self.frozen = False
        log.info("%s: thawed", self.name)

    def restart(self, timeout: float | None = None) -> "Service":
        """Stop, then start again with the same command (same port); waits until ready."""
        self.stop()
        return self.start(timeout)

    # -- internals

    def _signal(self, pids: list[int], sig: int) -> None:
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        _signal_pids(pids, sig)

    def _wait_gone(self, pids: list[int], timeout: float) -> bool:
        def gone() -> bool:
            if self.proc is not None:
                self.proc.poll()
            return not any(pid_alive(p) for p in pids)
        return wait_until(gone, timeout)

    def _reap(self) -> None:
        if self.proc is not None:
            try:
                self.proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                pass


def stop_all(services: list[Service], timeout: float = 5.0) -> None:
    """Stop several services at once: SIGTERM to all, then wait, then SIGKILL the rest."""
    live = [s for s in services if s.proc is not None]
    targets = {s.name: s.pids() for s in live}
    for s in live:
        s._signal(targets[s.name], signal.SIGTERM)
        s._signal(targets[s.name], signal.SIGCONT)
    everyone = [p for pids in targets.values() for p in pids]
    if not wait_until(lambda: not any(pid_alive(p) for p in everyone) and all(s.proc.poll() is not None for s in live), timeout):
        for s in live:
            leftover = [p for p in targets[s.name] if pid_alive(p)] + s.pids()
            if leftover:
                log.warning("%s: still alive after SIGTERM, sending SIGKILL", s.name)
                s._signal(leftover, signal.SIGKILL)
        wait_until(lambda: not any(pid_alive(p) for p in everyone), 5.0)
    for s in live:
        s._reap()
        s.frozen = False
