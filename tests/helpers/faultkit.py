"""Helpers of the fault suite (tests/test_faults.py): figure lines, a port watcher, queries through
a tunnel, and the secret scan (the Vault tap is ``dbtunneld.sandbox.vaulttap``).

* ``FigureLog``: each case records one line of figures; lines go to ``test-artifacts/faults.txt``
  and, through a small pytest plugin, into the terminal summary.
* ``PortWatcher``: connects to a local port every ``interval`` seconds in a thread and counts
  refusals (a tunnel's port must never refuse, whatever happens upstream).
* ``query``: one PyMySQL query through a local port with the daemon's current credentials.
* ``SecretScan``: collects secrets (tokens, passwords, keys) and places they must not appear
  (log files, state files, printed output, process command lines sampled in the background).
"""

from __future__ import annotations

import os
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"


# ---------------------------------------------------------------------------- figures

class FigureLog:
    """Lines of figures, one per case, written to ``test-artifacts/faults.txt``."""

    def __init__(self, path: Path = ARTIFACTS / "faults.txt") -> None:
        self.path = path
        self.lines: list[str] = []
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"# dbtunneld fault suite, {time.strftime('%Y-%m-%d %H:%M:%S')}\n")

    def record(self, case: str, text: str) -> str:
        line = f"{case}: {text}"
        self.lines.append(line)
        with self.path.open("a") as f:
            f.write(line + "\n")
        print(f"\nFAULT {line}")
        return line

    # pytest plugin hook: registered by the suite's module fixture
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if self.lines:
            terminalreporter.section("fault suite figures (also in test-artifacts/faults.txt)")
            for line in self.lines:
                terminalreporter.write_line(line)


# ---------------------------------------------------------------------------- traffic

class PortWatcher:
    """Connect to 127.0.0.1:``port`` every ``interval`` s; count refusals and other errors."""

    def __init__(self, port: int, interval: float = 0.1) -> None:
        self.port, self.interval = port, interval
        self.attempts = self.refused = self.errors = 0
        self.last_error = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"watch-{port}", daemon=True)

    def __enter__(self) -> "PortWatcher":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.attempts += 1
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2.0):
                    pass
            except ConnectionRefusedError as exc:
                self.refused += 1
                self.last_error = repr(exc)
            except OSError as exc:
                self.errors += 1
                self.last_error = repr(exc)


def query(port: int, creds: dict[str, Any], sql: str = "SELECT 1", timeout: float = 30.0) -> Any:
    """Run ``sql`` through 127.0.0.1:``port`` as the daemon's DB user; returns the first row."""
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=port, user=creds["username"], password=creds["password"],
                           database=creds.get("database") or None, connect_timeout=timeout,
                           read_timeout=timeout, write_timeout=timeout)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()
    finally:
        conn.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


# ---------------------------------------------------------------------------- the secret scan

@dataclass
class SecretScan:
    """Secrets seen during the run and the places they must never appear."""

    secrets: dict[str, str] = field(default_factory=dict)        # value -> what it is
    files: list[Path] = field(default_factory=list)
    texts: list[tuple[str, str]] = field(default_factory=list)   # (where, text)
    cmdlines: dict[int, str] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def secret(self, value: str | None, what: str) -> None:
        if value and len(value) >= 8:
            self.secrets.setdefault(value, what)

    def add_files(self, paths: Iterable[Path]) -> None:
        self.files.extend(Path(p) for p in paths)

    def add_text(self, where: str, text: str) -> None:
        self.texts.append((where, text))

    # process command lines, sampled while the suite runs
    def start_sampling(self, interval: float = 0.5) -> None:
        self._thread = threading.Thread(target=self._sample_loop, args=(interval,), name="cmdline-sampler", daemon=True)
        self._thread.start()

    def stop_sampling(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample_cmdlines()

    def _sample_loop(self, interval: float) -> None:
        while not self._stop.wait(interval):
            self.sample_cmdlines()

    def sample_cmdlines(self) -> None:
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    raw = Path(f"/proc/{entry}/cmdline").read_bytes()
                except OSError:
                    continue
                if raw:
                    self.cmdlines[int(entry)] = raw.replace(b"\0", b" ").decode(errors="replace")

    def hits(self) -> list[str]:
        """Where a secret was found: ``"<what> in <where>"`` (never the secret itself)."""
        found = []
        places = [(f"file {p}", _read(p)) for p in self.files if p.is_file()]
        places += self.texts
        places += [(f"cmdline of pid {pid}", text) for pid, text in self.cmdlines.items()]
        for where, text in places:
            for value, what in self.secrets.items():
                if value in text or _urlencoded(value) in text:
                    found.append(f"{what} in {where}")
        return found


def _read(path: Path) -> str:
    try:
        return path.read_bytes().decode(errors="replace")
    except OSError:
        return ""


def _urlencoded(value: str) -> str:
    from urllib.parse import quote

    return quote(value, safe="")


LOG_TRACEBACK = re.compile(r"^Traceback \(most recent call last\):", re.M)
