"""A private desktop for tests: Xvfb, a private D-Bus session bus, a tray host (trayer).

Every process is started here and stopped by its pid (also when the test fails): the
``Desktop`` context manager owns them. Display numbers come from Xvfb itself (-displayfd),
the bus address from ``dbus-daemon --print-address``; nothing touches the user's session.
Readiness is polled with deadlines, never guessed with sleeps.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

TOOLS = ("Xvfb", "dbus-daemon", "trayer", "xdotool", "xclip")


def missing_tools(tools=TOOLS) -> list[str]:
    return [t for t in tools if not shutil.which(t)]


def wait_for(predicate: Callable[[], object], timeout: float, what: str, interval: float = 0.05):
    """Poll until predicate() is truthy; return its value or raise TimeoutError naming ``what``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def children_of(pid: int) -> list[int]:
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def stop_pid(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout)


def _read_line_from_fd(fd: int, timeout: float, what: str) -> str:
    deadline, data = time.monotonic() + timeout, b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise TimeoutError(f"timed out waiting for {what}")
        chunk = os.read(fd, 4096)
        if not chunk:
            raise RuntimeError(f"{what}: the process closed its output")
        data += chunk
    return data.decode().strip()


class Desktop:
    """Xvfb + D-Bus session bus (+ trayer on request); ``env`` is what a client process needs."""

    def __init__(self, home: Path, size: str = "1024x768x24") -> None:
        self.home = Path(home)
        self.size = size
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.display = ""
        self.bus_address = ""
        self.env: dict[str, str] = {}

    def spawn(self, name: str, argv: list[str], **kw) -> subprocess.Popen:
        log = open(self.home / f"{name}.log", "ab")
        kw.setdefault("stdout", log)
        kw.setdefault("stderr", log)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, env=kw.pop("env", self.env or None), **kw)
        log.close()
        self.procs.append((name, proc))
        return proc

    def start_x(self) -> "Desktop":
        r, w = os.pipe()
        try:
            self.spawn("xvfb", ["Xvfb", "-displayfd", str(w), "-screen", "0", self.size, "-nolisten", "tcp",
                                "-noreset"], pass_fds=(w,), env=dict(os.environ))
            os.close(w)
            self.display = ":" + _read_line_from_fd(r, 15.0, "Xvfb to report its display number")
        finally:
            os.close(r)
        self.env = self.base_env()
        self.env["DISPLAY"] = self.display
        return self

    def start_bus(self) -> "Desktop":
        r, w = os.pipe()
        try:
            self.spawn("dbus", ["dbus-daemon", "--session", "--nofork", "--nopidfile", f"--print-address={w}"],
                       pass_fds=(w,))
            os.close(w)
            self.bus_address = _read_line_from_fd(r, 15.0, "dbus-daemon to print its address")
        finally:
            os.close(r)
        self.env["DBUS_SESSION_BUS_ADDRESS"] = self.bus_address
        return self

    def start_tray_host(self) -> "Desktop":
        self.spawn("trayer", ["trayer", "--edge", "top", "--align", "right", "--widthtype", "request",
                              "--height", "32", "--SetDockType", "true", "--transparent", "false",
                              "--tint", "0x404040"])
        wait_for(lambda: self.selection_owner("_NET_SYSTEM_TRAY_S0"), 15.0, "trayer to own the system tray")
        return self

    def base_env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("DBUS_", "XDG_", "DISPLAY", "WAYLAND", "GTK_", "PYSTRAY"))}
        env.update(HOME=str(self.home), XDG_RUNTIME_DIR=str(self._runtime_dir()),
                   XDG_CONFIG_HOME=str(self.home / ".config"), NO_AT_BRIDGE="1",
                   GSETTINGS_BACKEND="memory", GDK_BACKEND="x11", LANG="C.UTF-8")
        return env

    def _runtime_dir(self) -> Path:
        d = self.home / "xdg-runtime"
        d.mkdir(mode=0o700, exist_ok=True)
        return d

    def selection_owner(self, name: str) -> int:
        from Xlib import display as xdisplay

        d = xdisplay.Display(self.display)
        try:
            owner = d.get_selection_owner(d.intern_atom(name))
            return 0 if owner in (0, None) else owner.id
        finally:
            d.close()

    def run(self, argv: list[str], timeout: float = 10.0, **kw) -> subprocess.CompletedProcess:
        return subprocess.run(argv, env=self.env, capture_output=True, timeout=timeout, **kw)

    def screenshot(self, path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.run(["import", "-window", "root", str(path)], timeout=30, check=True)
        return path

    def stop(self) -> None:
        """Stop everything by pid, newest first; also what dbus-daemon activated."""
        for name, proc in reversed(self.procs):
            extra = children_of(proc.pid) if name == "dbus" else []
            stop_pid(proc)
            for pid in extra:
                try:
                    os.kill(pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        self.procs.clear()

    def alive(self) -> list[str]:
        return [f"{name} (pid {p.pid})" for name, p in self.procs if p.poll() is None]


@contextmanager
def desktop(home: Path, *, bus: bool = True, tray_host: bool = False) -> Iterator[Desktop]:
    d = Desktop(home)
    try:
        d.start_x()
        if bus:
            d.start_bus()
        if tray_host:
            d.start_tray_host()
        yield d
    finally:
        d.stop()
