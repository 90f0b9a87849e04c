"""``[bastion] client = "auto"`` (the default for transport ``ssh`` where OpenSSH can run): at each
connect, the SSH engine that suits the link to the bastion, measured then.

The two engines win in different places (``./dev bench``, same run, ratios to ``ssh -L``):

* a near bastion (loopback, same VPC or data centre): the OpenSSH master (``openssh_transport``)
  moves the bytes in C: mariadb-slap 1.2x, sysbench 1.0-1.2x, CPU per query 0.9-1.3x, download
  1.9x, against paramiko's 0.6-0.7x and 2-3x CPU;
* a far one (15 ms each way): paramiko (``transport.SshTransport``) grants a 16 MB channel window
  and downloads at 4.9x, where OpenSSH's fixed 2 MB window (``CHAN_TCP_WINDOW_DEFAULT`` in
  OpenSSH's channels.h, used by ``channel_connect_stdio_fwd`` for every mux stdio forward) caps a
  download at 2 MB per round trip (1.1x); round trips cost the link's delay on both, so the
  per-query CPU that decides the near case is noise there.

The crossover: OpenSSH's 2 MB per round trip equals what paramiko moves (~300-400 MB/s on this
machine's cores) at a round trip of ~5-7 ms; ``NEAR`` is 5 ms. The round trip (``ssh_round_trip``,
the best of ``PROBES``) is taken before each connect: the link can change (a laptop that leaves the
office VPN), and the engine with it on the next reconnect.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Any, Callable

from ..core.errors import TransientError
from .transport import Transport

log = logging.getLogger(__name__)

NEAR = 0.005          # s: a TCP round trip to the bastion at most this: the OpenSSH engine
PROBES = 2


IDENT_LIMIT = 8192    # bytes before the server's "SSH-" line (RFC 4253 4.2 allows other lines first)
PROBE_IDENT = b"SSH-2.0-dbtunneld_round_trip_probe\r\n"


def ssh_round_trip(host: str, port: int, timeout: float, probes: int = PROBES) -> float | None:
    """The round trip to the SSH server at host:port, best of ``probes`` (None: not reachable).

    One probe: the TCP handshake, then the server's identification line, then ours; OpenSSH's sshd
    answers ours with its KEXINIT (sshd.c/kex.c: ``kex_exchange_identification`` reads the
    client's version, then ``kex_send_kexinit``), so the time from our line to its next bytes is
    one round trip with no process start in it (sshd forks before its banner). The larger of the
    two counts: the handshake alone misses a TCP relay in between (it answers the handshake
    itself), the exchange alone misses a server that sends KEXINIT unasked. The probe logs in to
    nothing: sshd records it as closed before authentication."""
    best: float | None = None
    for _ in range(probes):
        took = _probe_once(host, port, timeout)
        if took is None:
            return best
        best = took if best is None else min(best, took)
    return best


def _probe_once(host: str, port: int, timeout: float) -> float | None:
    started = time.monotonic()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError:
        return None
    handshake = time.monotonic() - started
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        seen = b""
        while not _ident_line_end(seen):
            chunk = sock.recv(4096)
            if not chunk or len(seen) > IDENT_LIMIT:
                return handshake                    # not an SSH server as we know it: the handshake
            seen += chunk
        if seen[_ident_line_end(seen):]:
            return handshake                        # KEXINIT came unasked
        sent = time.monotonic()
        sock.sendall(PROBE_IDENT)
        if not sock.recv(1):
            return handshake
        return max(handshake, time.monotonic() - sent)
    except OSError:
        return handshake
    finally:
        sock.close()


def _ident_line_end(data: bytes) -> int:
    """Where the bytes after the server's "SSH-..." line start (0: not complete yet)."""
    at = data.find(b"SSH-")
    while at > 0 and data[at - 1:at] != b"\n":
        at = data.find(b"SSH-", at + 1)
    if at < 0:
        return 0
    end = data.find(b"\n", at)
    return 0 if end < 0 else end + 1


class AutoSshTransport(Transport):
    """Transport ``ssh`` on OpenSSH for a near bastion, on paramiko for a far one (see above);
    everything else goes to the engine of the current upstream."""

    kind = "ssh"
    pin_data_path = True

    def __init__(self, host: str, port: int, openssh: Callable[[], Transport], paramiko: Callable[[], Transport],
                 probe: Callable[[str, int, float], float | None] = ssh_round_trip,
                 near: float = NEAR, timeout: float = 10.0) -> None:
        self.host, self.port = host, port
        self._makers = {"openssh": openssh, "paramiko": paramiko}
        self._engines: dict[str, Transport] = {}
        self._probe = probe
        self._near = near
        self._timeout = timeout
        self._current: Transport | None = None
        self.round_trip: float | None = None        # the last measurement (s)

    @property
    def adopts_clients(self) -> bool:  # type: ignore[override]
        """As the current engine (known once connected; False before)."""
        current = self._current
        return current is not None and current.adopts_clients

    @property
    def ssh_client(self) -> str:  # type: ignore[override]
        current = self._current
        return current.ssh_client if current is not None else "auto"

    def choose(self) -> str:
        """The engine for the link as it is now."""
        self.round_trip = self._probe(self.host, self.port, self._timeout)
        if self.round_trip is None:
            return "openssh"                # unreachable: either engine says so; keep OpenSSH's words
        return "openssh" if self.round_trip <= self._near else "paramiko"

    def connect(self) -> None:
        name = self.choose()
        engine = self._engines.get(name)
        if engine is None:
            engine = self._engines[name] = self._makers[name]()
        previous, self._current = self._current, engine
        if previous is not None and previous is not engine:
            previous.close()
        if previous is not engine:
            rtt = "unreachable" if self.round_trip is None else f"{self.round_trip * 1000:.2f} ms"
            log.info("bastion %s:%d: TCP round trip %s, SSH engine %s (OpenSSH up to %.0f ms)",
                     self.host, self.port, rtt, name, self._near * 1000)
        engine.connect()

    def _engine(self) -> Transport:
        current = self._current
        if current is None:
            raise TransientError("ssh: not connected")
        return current

    def open_channel(self, host: str, port: int, timeout: float) -> Any:
        return self._engine().open_channel(host, port, timeout)

    async def adopt(self, client: socket.socket, host: str, port: int, timeout: float) -> Any:
        engine = self._engine()
        if not engine.adopts_clients:            # the engine changed at a reconnect meanwhile
            raise TransientError("ssh: the SSH engine changed at a reconnect; try again")
        return await engine.adopt(client, host, port, timeout)

    def adopt_blocking(self, client: socket.socket, host: str, port: int, timeout: float) -> Any:
        return self._engine().adopt_blocking(client, host, port, timeout)

    def is_alive(self) -> bool:
        current = self._current
        return current is not None and current.is_alive()

    def ping(self, timeout: float) -> bool:
        current = self._current
        return current is not None and current.ping(timeout)

    def ping_interval(self, keepalive_interval: float) -> float:
        return self._engine().ping_interval(keepalive_interval)

    def keepalive(self, answered: Callable[[], None], wait: bool = False) -> bool | None:
        current = self._current
        return False if current is None else current.keepalive(answered, wait)

    def on_closed(self, callback: Callable[[], None]) -> None:
        current = self._current
        if current is None:
            callback()
        else:
            current.on_closed(callback)

    def wait_closed(self, timeout: float | None = None) -> bool:
        current = self._current
        return True if current is None else current.wait_closed(timeout)

    def why_closed(self) -> str:
        current = self._current
        return current.why_closed() if current is not None else ""

    def close(self) -> None:
        for engine in list(self._engines.values()):
            engine.close()

    def describe(self) -> str:
        current = self._current
        return current.describe() if current is not None else "ssh (auto)"
