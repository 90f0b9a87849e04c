"""TLS to the database server inside the tunnel's channel (``upstream_tls``, login = "local").

The channel is whatever the transport opened (an SSH channel, an smux stream's socket), not
always a socket, so TLS runs on an ``ssl.SSLObject`` over memory BIOs (``TlsStream``), and the
forwarding loop, which relays plain sockets, gets one end of a socket pair bridged to it by two
threads, one per direction (``bridge``; the SSL object is used under one lock).

The server's certificate is not verified: the path to the server is already the authenticated
SSH/SSM tunnel; TLS here is what a server that requires it (``REQUIRE SSL``) asks for.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
from typing import Any

READ_SIZE = 256 * 1024
MODES = ("off", "auto", "required")


def client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


class TlsStream:
    """TLS over a blocking stream with ``recv``/``sendall`` (socket-like for the login code)."""

    def __init__(self, stream: Any, ctx: ssl.SSLContext) -> None:
        self.stream = stream
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self._tls = ctx.wrap_bio(self._in, self._out, server_side=False)
        self._lock = threading.Lock()          # the SSL object
        self._send_lock = threading.Lock()     # the stream's writes, in order

    def handshake(self) -> None:
        while True:
            try:
                with self._lock:
                    self._tls.do_handshake()
                self._flush()
                return
            except ssl.SSLWantReadError:
                self._flush()
                self._feed()

    def cipher(self) -> str:
        c = self._tls.cipher()
        return c[0] if c else ""

    def recv(self, n: int) -> bytes:
        while True:
            try:
                with self._lock:
                    data = self._tls.read(n)
                self._flush()                  # TLS 1.3 may answer (key update)
                return data
            except ssl.SSLWantReadError:
                if not self._feed():
                    return b""
            except ssl.SSLZeroReturnError:
                return b""

    def sendall(self, data: bytes) -> None:
        with self._lock:
            self._tls.write(data)
        self._flush()

    def settimeout(self, timeout: float | None) -> None:
        setter = getattr(self.stream, "settimeout", None)
        if setter is not None:
            setter(timeout)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.stream.close()

    def _feed(self) -> bool:
        data = self.stream.recv(READ_SIZE)
        with self._lock:
            if data:
                self._in.write(data)
            else:
                self._in.write_eof()
        return bool(data)

    def _flush(self) -> None:
        with self._send_lock:
            with self._lock:
                out = self._out.read()
            if out:
                self.stream.sendall(out)


def bridge(tls: TlsStream, label: str) -> socket.socket:
    """A plain socket standing for the server: what the loop writes to it is encrypted to the
    server, what the server sends comes out of it."""
    inner, outer = socket.socketpair()
    tls.settimeout(None)
    ends = _Ends(tls, inner)
    threading.Thread(target=ends.down, daemon=True, name=f"{label}-tls-down").start()
    threading.Thread(target=ends.up, daemon=True, name=f"{label}-tls-up").start()
    return outer


class _Ends:
    def __init__(self, tls: TlsStream, inner: socket.socket) -> None:
        self.tls, self.inner = tls, inner
        self._closing = threading.Lock()
        self._open = 2

    def down(self) -> None:
        try:
            while data := self.tls.recv(READ_SIZE):
                self.inner.sendall(data)
            with contextlib.suppress(OSError):
                self.inner.shutdown(socket.SHUT_WR)
        except (OSError, ValueError, ssl.SSLError, EOFError):
            pass
        self._done()

    def up(self) -> None:
        try:
            while data := self.inner.recv(READ_SIZE):
                self.tls.sendall(data)
        except (OSError, ValueError, ssl.SSLError, EOFError):
            pass
        with contextlib.suppress(Exception):            # the client is done: end the channel
            shut = getattr(self.tls.stream, "shutdown_write", None)
            shut() if shut else self.tls.stream.shutdown(socket.SHUT_WR)
        self._done()

    def _done(self) -> None:
        with self._closing:
            self._open -= 1
            last = self._open == 0
        if last:
            self.tls.close()
            with contextlib.suppress(OSError):
                self.inner.close()
