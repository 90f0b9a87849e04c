"""A TCP delay line for benchmarks: every byte arrives ``delay`` seconds after it was sent.

``DelayProxy(target_port, delay=0.015)`` listens on 127.0.0.1 and relays each connection to
the target, holding every chunk for ``delay`` seconds in each direction (so a round trip gains
2 x delay). It adds latency, not a bandwidth limit: a reader thread takes bytes as they come
and a writer thread releases them when due, so what limits throughput is the end-to-end flow
control being measured (e.g. an SSH channel window), like on a long link.
"""

from __future__ import annotations

import collections
import socket
import threading
import time

CHUNK = 256 * 1024


class _Line:
    """One direction of one connection: a queue of (due time, bytes)."""

    def __init__(self, src: socket.socket, dst: socket.socket, delay: float) -> None:
        self.src, self.dst, self.delay = src, dst, delay
        self.queue: collections.deque[tuple[float, bytes]] = collections.deque()
        self.cond = threading.Condition()

    def start(self) -> None:
        for target in (self._read, self._write):
            threading.Thread(target=target, daemon=True, name="delayproxy").start()

    def _read(self) -> None:
        try:
            while data := self.src.recv(CHUNK):
                self._put(data)
        except OSError:
            pass
        self._put(b"")

    def _put(self, data: bytes) -> None:
        with self.cond:
            self.queue.append((time.monotonic() + self.delay, data))
            self.cond.notify()

    def _write(self) -> None:
        try:
            while True:
                due, data = self._next()
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                if not data:
                    self.dst.shutdown(socket.SHUT_WR)
                    return
                self.dst.sendall(data)
        except OSError:
            for s in (self.src, self.dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def _next(self) -> tuple[float, bytes]:
        with self.cond:
            while not self.queue:
                self.cond.wait()
            return self.queue.popleft()


class DelayProxy:
    def __init__(self, target_port: int, delay: float = 0.015, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.delay = delay
        self._sock = socket.create_server(("127.0.0.1", 0), backlog=256)
        self.port = self._sock.getsockname()[1]
        self._closed = False
        self._conns: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True, name="delayproxy-accept").start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            for s in (client, upstream):
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                self._conns.append(s)
            _Line(client, upstream, self.delay).start()
            _Line(upstream, client, self.delay).start()

    def close(self) -> None:
        self._closed = True
        self._sock.close()
        for s in self._conns:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()

    def __enter__(self) -> "DelayProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
