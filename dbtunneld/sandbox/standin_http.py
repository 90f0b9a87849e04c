"""Shared HTTP plumbing for the sandbox's stand-in servers (aws auth, SSO).

A threaded HTTP/1.1 server with keep-alive and TCP_NODELAY, JSON helpers, and the process
glue every stand-in needs: exit on SIGTERM and when the parent process goes away.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


class Handler(BaseHTTPRequestHandler):
    """Base handler: HTTP/1.1 keep-alive, TCP_NODELAY, quiet logging, JSON helpers."""

    protocol_version = "HTTP/1.1"
    server_version = "dbtunneld-standin"
    timeout = 120  # idle keep-alive connections are closed after this

    def setup(self) -> None:
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, fmt: str, *args: Any) -> None:  # access log only at DEBUG
        logging.getLogger(self.__class__.__module__).debug("%s " + fmt, self.address_string(), *args)

    def read_body(self) -> bytes:
        """The request body (Content-Length or chunked transfer encoding)."""
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def _read_chunked(self) -> bytes:
        parts = []
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():   # trailers, then the blank line
                    pass
                return b"".join(parts)
            parts.append(self.rfile.read(size))
            self.rfile.readline()

    def read_json(self) -> Any:
        body = self.read_body()
        return json.loads(body) if body.strip() else {}

    def send_raw(self, status: int, body: bytes, headers: list[tuple[str, str]] | None = None,
                 content_type: str | None = "application/json") -> None:
        self.send_response(status)
        if content_type:
            self.send_header("Content-Type", content_type)
        for k, v in headers or []:
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, obj: Any, headers: list[tuple[str, str]] | None = None) -> None:
        self.send_raw(status, json.dumps(obj).encode(), headers)


def serve(server: Server, name: str) -> int:
    """Run ``server`` until SIGTERM/SIGINT or until the parent process exits, then exit at
    once (a stand-in keeps nothing worth flushing; open keep-alive connections just close)."""
    parent = os.getppid()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    logging.getLogger(name).info("%s listening on %s:%s", name, host, port)
    while not stop.wait(0.5):
        if os.getppid() != parent:
            break
    server.server_close()
    logging.getLogger(name).info("%s stopped", name)
    logging.shutdown()
    os._exit(0)


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(stream=sys.stderr, level=level,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
