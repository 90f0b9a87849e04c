"""Helpers shared by the SSM tests and benchmark: the stand-in as a process, a data server.

* ``StandInProcess``: runs ``python -m dbtunneld.sandbox.ssm_standin`` with the given flags,
  waits for its ``READY`` line (bounded), talks to its control API, stops it by pid.
  ``credentials={access key: secret}`` go to the stand-in in a 0600 file (never in argv), so
  it verifies those keys' SigV4 signatures.
* ``DataServer``: a threaded TCP server speaking a tiny line protocol, so transfers can be
  checked byte for byte: ``D <n> <seed>`` sends n bytes of a seeded pattern, ``U <n>`` reads
  n bytes and answers their SHA-256 (hex, newline), ``E`` echoes until EOF.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from typing import Any

PATTERN_PERIOD = 1_000_003  # not a multiple of any message or frame size: shifts show up


def pattern_block(seed: int) -> bytes:
    return random.Random(seed).randbytes(PATTERN_PERIOD)


def pattern(n: int, seed: int = 1) -> bytes:
    """n bytes of the seeded pattern (the block repeated)."""
    block = pattern_block(seed)
    reps, rest = divmod(n, PATTERN_PERIOD)
    return block * reps + block[:rest]


def pattern_digest(n: int, seed: int = 1) -> str:
    return hashlib.sha256(pattern(n, seed)).hexdigest()


class StandInProcess:
    """The SSM stand-in in its own process, stopped by pid (also when a test fails)."""

    def __init__(self, *args: str, env: dict[str, str] | None = None, log_path: str | None = None, credentials: dict[str, str] | None = None) -> None:
        self.args = list(args)
        self.credentials = dict(credentials or {})
        self._credentials_dir: str | None = None
        self.env = env
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, timeout: float = 15.0) -> "StandInProcess":
        stderr = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL
        argv = [sys.executable, "-m", "dbtunneld.sandbox.ssm_standin", *self.args, *self._credentials_args()]
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=stderr, stdin=subprocess.DEVNULL, env=self.env, start_new_session=True)
        if self.log_path:
            stderr.close()  # type: ignore[union-attr]
        line = self._read_ready(timeout)
        if not line.startswith("READY "):
            self.stop()
            raise RuntimeError(f"SSM stand-in did not start (got {line!r}); see {self.log_path or 'its stderr'}")
        self.url = line.split()[1]
        return self

    def _credentials_args(self) -> list[str]:
        if not self.credentials:
            return []
        self._credentials_dir = tempfile.mkdtemp(prefix="ssm-standin-")
        path = os.path.join(self._credentials_dir, "credentials.json")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            json.dump(self.credentials, handle)
        return ["--credentials-file", path]

    def _read_ready(self, timeout: float) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        while b"\n" not in buf and time.monotonic() < deadline:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                break
            chunk = os.read(self.proc.stdout.fileno(), 4096)
            if not chunk:
                break
            buf += chunk
        return buf.decode(errors="replace").strip()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def stop(self, timeout: float = 5.0) -> None:
        if self._credentials_dir:
            shutil.rmtree(self._credentials_dir, ignore_errors=True)
            self._credentials_dir = None
        proc = self.proc
        if proc is None or proc.poll() is not None:
            return
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def control(self, path: str, body: dict[str, Any] | None = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(self.url + path, data=data, method="POST" if body is not None else "GET")
        with urllib.request.urlopen(request, timeout=10) as resp:
            return json.loads(resp.read())

    def sessions(self) -> list[dict[str, Any]]:
        return self.control("/_standin/sessions")["sessions"]

    def session(self, session_id: str) -> dict[str, Any]:
        return next(s for s in self.sessions() if s["SessionId"] == session_id)

    def __enter__(self) -> "StandInProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DataServer:
    """A threaded TCP server on 127.0.0.1 for checked transfers (see the module docstring)."""

    def __init__(self) -> None:
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self._sock.getsockname()[1]
        self._stop = False
        self._blocks: dict[int, bytes] = {}
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._accept_loop, name="data-server", daemon=True)
        self._thread.start()

    def _block(self, seed: int) -> bytes:
        with self._lock:
            if seed not in self._blocks:
                self._blocks[seed] = pattern_block(seed)
            return self._blocks[seed]

    def _accept_loop(self) -> None:
        while not self._stop:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        try:
            with conn, conn.makefile("rb") as reader:
                words = reader.readline().split()
                if not words:
                    return
                if words[0] == b"D":
                    self._send_pattern(conn, int(words[1]), int(words[2]) if len(words) > 2 else 1)
                elif words[0] == b"U":
                    conn.sendall(self._digest_upload(reader, int(words[1])).encode() + b"\n")
                elif words[0] == b"E":
                    self._echo(conn, reader)
        except OSError:
            pass

    def _send_pattern(self, conn: socket.socket, n: int, seed: int) -> None:
        block = self._block(seed)
        sent = 0
        while sent < n:
            offset = sent % PATTERN_PERIOD
            chunk = block[offset : offset + min(n - sent, 1 << 20)]
            conn.sendall(chunk)
            sent += len(chunk)

    @staticmethod
    def _digest_upload(reader: Any, n: int) -> str:
        digest = hashlib.sha256()
        left = n
        while left:
            chunk = reader.read1(min(left, 1 << 20))
            if not chunk:
                break
            digest.update(chunk)
            left -= len(chunk)
        return digest.hexdigest()

    @staticmethod
    def _echo(conn: socket.socket, reader: Any) -> None:
        while True:
            chunk = reader.read1(1 << 16)
            if not chunk:
                return
            conn.sendall(chunk)

    def close(self) -> None:
        self._stop = True
        self._sock.close()


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    chunks = []
    left = n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def download(sock: socket.socket, n: int, seed: int = 1) -> tuple[str, int]:
    """Ask the DataServer on ``sock`` for n pattern bytes; (sha256 hex, bytes received)."""
    sock.sendall(f"D {n} {seed}\n".encode())
    digest = hashlib.sha256()
    got = 0
    while got < n:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        digest.update(chunk)
        got += len(chunk)
    return digest.hexdigest(), got


def upload(sock: socket.socket, n: int, seed: int = 1) -> str:
    """Send n pattern bytes to the DataServer on ``sock``; the SHA-256 it computed (hex)."""
    sock.sendall(f"U {n}\n".encode())
    sock.sendall(pattern(n, seed))
    line = b""
    while not line.endswith(b"\n"):
        chunk = sock.recv(128)
        if not chunk:
            break
        line += chunk
    return line.decode().strip()
