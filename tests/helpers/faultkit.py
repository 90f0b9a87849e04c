"""Helpers of the fault suite (tests/test_faults.py): figure lines, a port watcher, queries through
a tunnel, Vault's audit log, and the secret scan.

* ``FigureLog``: each case records one line of figures; lines go to ``test-artifacts/faults.txt``
  and, through a small pytest plugin, into the terminal summary.
* ``PortWatcher``: connects to a local port every ``interval`` seconds in a thread and counts
  refusals (a tunnel's port must never refuse, whatever happens upstream).
* ``query``: one PyMySQL query through a local port with the daemon's current credentials.
* ``VaultTap``: a proxy in front of Vault that notes the Vault tokens a daemon was given (for the
  secret scan) and counts its requests.
* ``SecretScan``: collects secrets (tokens, passwords, keys) and places they must not appear
  (log files, state files, printed output, process command lines sampled in the background).
"""

from __future__ import annotations

import json
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


# ---------------------------------------------------------------------------- Vault tokens on the wire

class VaultTap:
    """A TCP proxy in front of Vault that notes every token crossing it and counts requests.

    OpenBao refuses to enable an audit device through its API, so the suite learns the Vault
    tokens a daemon was given here: ``X-Vault-Token`` request headers and ``client_token`` in
    login replies. Point a daemon's ``vault.address`` at ``address``.
    """

    TOKEN_HEADER = re.compile(rb"(?i)x-vault-token:[ \t]*([A-Za-z0-9._-]{16,})")
    CLIENT_TOKEN = re.compile(rb'"client_token"\s*:\s*"([^"]{16,})"')
    REQUEST_LINE = re.compile(rb"(?:GET|POST|PUT|DELETE|LIST|PATCH) /v1/\S* HTTP/1\.[01]\r\n")

    def __init__(self, upstream: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.tokens: set[str] = set()
        self.requests = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.address = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept_loop, name="vault-tap", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        t = threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True)
        t.start()
        self._pump(upstream, client, False)
        t.join(30)

    def _pump(self, src: socket.socket, dst: socket.socket, to_vault: bool) -> None:
        buf, pos = b"", 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                buf += data
                pos = self._scan(buf, pos, to_vault)
                if len(buf) > 1 << 16:
                    cut = max(0, pos - 256)
                    buf, pos = buf[cut:], pos - cut
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _scan(self, buf: bytes, pos: int, to_vault: bool) -> int:
        pattern = self.TOKEN_HEADER if to_vault else self.CLIENT_TOKEN
        with self._lock:
            self.tokens.update(m.group(1).decode() for m in pattern.finditer(buf, max(0, pos - 256)))
            if to_vault:
                matches = list(self.REQUEST_LINE.finditer(buf, pos))
                self.requests += len(matches)
                if matches:
                    return matches[-1].end()
        return pos if to_vault else max(pos, len(buf) - 256)

    def close(self) -> None:
        self._closed = True
        self._listener.close()


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
