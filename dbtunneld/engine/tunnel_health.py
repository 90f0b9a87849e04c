"""Is a tunnel's upstream still good? The checks a tunnel's keeper makes while it is up, and when.

The keepalives and the upstream's end are not the keeper's: ``keepalive.UpstreamWatch`` runs
them on the engine loop by events and wakes the keeper ("died", "silent"). Here: the MySQL
greeting probe through the tunnel (``probe_mysql``, or the login probe ``login_probe`` builds)
after each (re)connect, when asked, and while clients log in; and a keepalive on demand (a
check asked for). ``UpstreamHealth.check`` runs what is due (blocking: the tunnel's step runs
it on the engine's worker pool) and returns a ``Finding``; the tunnel decides what the finding
does to its state. An idle tunnel that has proven its path has nothing due: no steps at all.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Literal

from ..adapters.mysqlwire import ProbeResult, ProtocolError, parse_first_packet
from ..adapters.transport import Transport
from ..core.config import TunnelSettings
from ..core.errors import DbtunneldError, NeedsUserError, TransientError
from ..core.timing import Clock

Probe = Callable[[Transport, str, int, float], ProbeResult]

REFUSED_HINTS = {
    1129: "the cluster blocked the bastion after too many aborted connects: run FLUSH HOSTS on it "
          "and raise max_connect_errors in its parameter group",
    1040: "the cluster has too many connections; close idle sessions or raise max_connections",
}
# reasons (``Tunnel`` wakes) that make every check run now
CHECK_NOW = frozenset({"check", "suspect"})


def probe_mysql(transport: Transport, host: str, port: int, timeout: float) -> ProbeResult:
    """Open a channel, read the server's first packet, close. 0x0a: a greeting; 0xff: it refuses.

    Raises TransientError when nothing (or not MySQL) comes back in time.
    """
    chan = transport.open_channel(host, port, timeout)
    try:
        if hasattr(chan, "settimeout"):
            chan.settimeout(timeout)
        header = _read_exact(chan, 4)
        length = int.from_bytes(header[:3], "little")
        payload = _read_exact(chan, min(length, 512))
    except (OSError, EOFError) as exc:
        raise TransientError(f"no MySQL greeting from {host}:{port}: {exc or type(exc).__name__}") from None
    finally:
        close_quietly(chan)
    try:
        return parse_first_packet(payload)
    except ProtocolError as exc:
        raise TransientError(f"{host}:{port} answered, but {exc}") from None


def _read_exact(chan: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = chan.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed before the greeting")
        buf += chunk
    return buf


def close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:
        pass


@dataclass(frozen=True)
class Finding:
    """What a check found. ``fine``: nothing to change; ``proven``: the path to the database
    answered (``error``/``hint`` set when the server refused the probe); ``lost``: the upstream is
    gone (``error`` says why); ``unusable``: it needs the user (``error``, ``hint``)."""

    kind: Literal["fine", "proven", "lost", "unusable"]
    error: str = ""
    hint: str = ""


FINE = Finding("fine")


class UpstreamHealth:
    """The check schedule of one tunnel's current upstream. ``traffic()`` counts bytes received
    from the upstream so far (evidence of life while a keepalive is late)."""

    def __init__(self, settings: TunnelSettings, clock: Clock, transport: Transport, probe: Probe,
                 remote: tuple[str, int], traffic: Callable[[], int], log: Any) -> None:
        self._settings = settings
        self._clock = clock
        self._transport = transport
        self._probe = probe
        self._remote = remote
        self._traffic = traffic
        self._log = log
        self._lock = threading.Lock()
        self._next_probe = 0.0
        self._clients_since_probe = 0
        self._probed = False              # the current upstream passed a probe already

    def reset(self) -> None:
        """A fresh upstream: a probe at once (prove the path)."""
        with self._lock:
            self._next_probe = self._clock.time()
            self._probed = False

    def client_arrived(self) -> bool:
        """Count a client; True for the first since the last probe (the keeper should look when
        a probe falls due; until then an idle tunnel has nothing due)."""
        with self._lock:
            self._clients_since_probe += 1
            return self._clients_since_probe == 1

    def due_in(self) -> float:
        """Seconds until the next check is due (0 or less: now; ``math.inf``: nothing is due)."""
        with self._lock:
            if self._probed and self._clients_since_probe == 0:
                return math.inf
            return self._next_probe - self._clock.time()

    def check(self, reasons: set[str]) -> Finding:
        """Run the checks due now (all of them when ``reasons`` ask for a check). "died" and
        "silent" are the upstream watch's news (``keepalive.UpstreamWatch``)."""
        s, now = self._settings, self._clock.time()
        if "died" in reasons or not self._transport.is_alive():
            return Finding("lost", self._transport.why_closed() or "the connection to the bastion closed")
        if "silent" in reasons:
            return Finding("lost", f"the bastion did not answer a keepalive within {s.health_timeout:g} s")
        asked = bool(reasons & CHECK_NOW)
        if asked and not self._keepalive_answered():
            return Finding("lost", f"the bastion did not answer a keepalive within {s.health_timeout:g} s")
        if asked or now >= self._next_probe:
            self._next_probe = now + s.health_interval
            if self._probe_due(asked):
                return self._check_database()
        return FINE

    def _keepalive_answered(self) -> bool:
        flowed = self._traffic()
        if self._transport.ping(self._settings.health_timeout):
            return True
        if self._traffic() != flowed:       # late, but bytes are arriving: busy, not dead
            self._log.info("keepalive answer late while data flows; the upstream is alive")
            return True
        return False

    def _probe_due(self, asked: bool) -> bool:
        """The greeting probe ends in an aborted handshake, which MySQL counts against the
        bastion's address (max_connect_errors, shared by every developer behind that bastion;
        only a successful login resets it). So it runs after each (re)connect, when asked, and
        periodically only while clients are logging in between probes; an idle tunnel relies on
        SSH keepalives, and the next client's channel open tests the path to the database."""
        with self._lock:
            clients, self._clients_since_probe = self._clients_since_probe, 0
        return asked or clients > 0 or not self._probed

    def _check_database(self) -> Finding:
        host, port = self._remote
        flowed = self._traffic()
        try:
            result = self._probe(self._transport, host, port, self._settings.health_timeout)
        except NeedsUserError as exc:
            return Finding("unusable", exc.message, exc.hint)
        except (DbtunneldError, OSError) as exc:
            if self._traffic() != flowed:
                self._log.info("health probe failed while data flows (%s); trying again later", exc)
                return FINE
            return Finding("lost", str(exc))
        self._probed = True
        if result.ok:
            return Finding("proven")
        error = f"MySQL at {host}:{port} answers but refuses connections: {result.code} {result.detail}"
        return Finding("proven", error, REFUSED_HINTS.get(result.code, "see the cluster's error log"))
