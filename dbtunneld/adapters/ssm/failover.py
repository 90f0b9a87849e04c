"""Aurora failover on SSM port sessions: when to throw the session away and start a new one.

The SSM agent resolves a port session's host once, when the session starts, and dials those
addresses for every stream (amazon-ssm-agent agent/session/plugins/port/port_mux.go
``DialCall(..., p.addressList)``). After an Aurora failover the cluster endpoint's DNS name
points at the new writer, but an old session keeps reaching the old one, now a reader (or
down). Three signs say the session is stale; each calls ``on_stale(reason)`` once:

* ``EndpointWatch``: the endpoint's DNS answer, re-resolved every few seconds (Aurora's TTL is
  5 s), differs from the one the session started with (writer endpoints only: reader and custom
  endpoints rotate their answers);
* ``connect_to_port_error``: the agent sent the ConnectToPortError flag (it could not dial);
* ``ReadOnlyWatch``: on a writer endpoint, the server answered a statement with MySQL error
  1290 (``--read-only``) or 1836 (read-only mode), seen in plain-text MySQL traffic (TLS
  sessions are opaque; the DNS watch still covers them). The client still gets its error.

The owner (the transport) rebuilds; nothing here retries.
"""

from __future__ import annotations

import logging
import socket
import struct
import threading
from typing import Any, Callable

log = logging.getLogger(__name__)

Resolver = Callable[[str], frozenset[str]]
DNS_INTERVAL = 5.0
READ_ONLY_CODES = (1290, 1836)
# An ERR packet's payload starts 0xff, the code (little-endian), '#', the SQLSTATE (HY000 for both).
_READ_ONLY_MARKERS = tuple(b"\xff" + struct.pack("<H", code) + b"#HY000" for code in READ_ONLY_CODES)
_TAIL = max(len(m) for m in _READ_ONLY_MARKERS) + 4


def system_resolver(host: str) -> frozenset[str]:
    """The addresses ``host`` resolves to here (empty when it does not resolve)."""
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None, type=socket.SOCK_STREAM))
    except OSError:
        return frozenset()


def is_writer_endpoint(host: str) -> bool:
    """Not an Aurora reader (``.cluster-ro-``) or custom (``.cluster-custom-``) endpoint: those
    rotate their DNS answers between instances and may answer read-only by design."""
    name = host.lower()
    return ".cluster-ro-" not in name and ".cluster-custom-" not in name


class EndpointWatch:
    """Re-resolves ``host`` every ``interval`` seconds in a thread; a changed answer is stale."""

    def __init__(self, host: str, on_stale: Callable[[str], None], *, resolve: Resolver = system_resolver,
                 interval: float = DNS_INTERVAL) -> None:
        self.host = host
        self._on_stale = on_stale
        self._resolve = resolve
        self._interval = interval
        self._stop = threading.Event()
        self.baseline = resolve(host)
        self._thread = threading.Thread(target=self._run, name=f"dns-watch-{host}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            answer = self._resolve(self.host)
            if answer and self.baseline and answer != self.baseline:
                self._stop.set()
                self._on_stale(f"{self.host} now resolves to {', '.join(sorted(answer))} "
                               f"(the session reaches {', '.join(sorted(self.baseline))})")
            elif answer and not self.baseline:
                self.baseline = answer

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(2.0)


def contains_read_only_error(data: bytes) -> int:
    """The read-only error code found in ``data`` as a MySQL ERR packet, else 0."""
    for code, marker in zip(READ_ONLY_CODES, _READ_ONLY_MARKERS):
        at = data.find(marker)
        while at >= 4:
            length = int.from_bytes(data[at - 4 : at - 1], "little")
            if 9 <= length <= 1024:  # a plausible ERR packet header right before it
                return code
            at = data.find(marker, at + 1)
    return 0


class ReadOnlyWatch:
    """A stream (socket-like) whose received bytes are checked for read-only ERR packets."""

    def __init__(self, stream: Any, on_read_only: Callable[[int], None]) -> None:
        self._stream = stream
        self._on_read_only = on_read_only
        self._tail = b""
        self._seen = False

    def recv(self, size: int) -> bytes:
        data: bytes = self._stream.recv(size)
        self.inspect(data)
        return data

    def inspect(self, data: bytes) -> None:
        """Check bytes received from the server (once a read-only answer was seen, no more)."""
        if data and not self._seen:
            window = self._tail + data
            code = contains_read_only_error(window)
            self._tail = window[-_TAIL:]
            if code:
                self._seen = True
                self._on_read_only(code)

    def forward_upstream(self) -> Any:
        """The forwarding loop's view (``forward_upstream.upstream_for``): the stream's socket, inspected."""
        from ..forward_upstream import SocketUpstream

        return SocketUpstream(self._stream, inspect=self.inspect)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    def __enter__(self) -> "ReadOnlyWatch":
        return self

    def __exit__(self, *exc: object) -> None:
        self._stream.close()
