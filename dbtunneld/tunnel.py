"""A tunnel unit: one cluster's listener on 127.0.0.1:PORT and the upstream that heals itself.

The unit owns its listener for its whole life: the port is bound once and stays bound while
the upstream is rebuilt, so a client that connects during a rebuild waits (up to
``tunnels.connect_wait``) and then flows. Every accepted connection gets its own upstream
channel (opened on a pooled thread), then one loop thread per tunnel (``forward.Forwarder``)
moves the bytes of all its connections, with back-pressure both ways.

One keeper thread owns the state machine (``TRANSITIONS``, guarded by ``StateMachine``) and is
the only place that retries: it connects, keeps the upstream alive (SSH keepalive pings and a
MySQL greeting probe through the tunnel), notices death (a watcher thread per upstream), and
reconnects with backoff (the first retry is immediate). Time comes from an injected
``timing.Clock`` so the schedule is tested without sleeping.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from . import forward, ports
from .command_watch import CommandWatch, Handoff
from .config import TunnelSettings
from .errors import (DbtunneldError, NeedsUserError, PortInUseError, SignInNeededError,
                     TransientError)
from .log import RepeatLimiter, unit_logger
from .model import TunnelState, TunnelStatus
from .timing import SYSTEM_CLOCK, Backoff, Clock
from .transport import Transport

log = logging.getLogger(__name__)

S = TunnelState

# ---- the state machine -----------------------------------------------------------------------

TRANSITIONS: dict[TunnelState, frozenset[TunnelState]] = {
    S.STOPPED: frozenset({S.WAITING_CREDENTIALS, S.CONNECTING, S.FAILED}),
    S.WAITING_CREDENTIALS: frozenset({S.CONNECTING, S.RECONNECTING, S.BACKOFF, S.NEEDS_SIGN_IN,
                                      S.FAILED, S.STOPPED}),
    S.CONNECTING: frozenset({S.UP, S.BACKOFF, S.WAITING_CREDENTIALS, S.NEEDS_SIGN_IN, S.FAILED,
                             S.STOPPED}),
    S.UP: frozenset({S.RECONNECTING, S.BACKOFF, S.WAITING_CREDENTIALS, S.FAILED, S.STOPPED}),
    S.RECONNECTING: frozenset({S.UP, S.BACKOFF, S.WAITING_CREDENTIALS, S.NEEDS_SIGN_IN, S.FAILED,
                               S.STOPPED}),
    S.BACKOFF: frozenset({S.CONNECTING, S.RECONNECTING, S.WAITING_CREDENTIALS, S.NEEDS_SIGN_IN,
                          S.FAILED, S.STOPPED}),
    S.NEEDS_SIGN_IN: frozenset({S.WAITING_CREDENTIALS, S.CONNECTING, S.STOPPED}),
    S.FAILED: frozenset({S.WAITING_CREDENTIALS, S.CONNECTING, S.STOPPED}),
}


class IllegalMoveError(RuntimeError):
    """A programming error: a move the state table does not allow."""


@dataclass(frozen=True)
class Moment:
    """The state and what goes with it (shown in the status)."""

    state: TunnelState = S.STOPPED
    since: float | None = None
    last_error: str = ""
    hint: str = ""
    next_retry_at: float | None = None


class StateMachine:
    """The current ``Moment``; ``move`` accepts only the moves in ``TRANSITIONS``.

    Staying in the same state is not a move: it refreshes the details and keeps ``since``.
    """

    def __init__(self, clock: Clock, table: dict[TunnelState, frozenset[TunnelState]] = TRANSITIONS) -> None:
        self._clock = clock
        self._table = table
        self.now = Moment(since=clock.time())

    @property
    def state(self) -> TunnelState:
        return self.now.state

    def allowed(self, target: TunnelState) -> bool:
        return target == self.state or target in self._table[self.state]

    def move(self, target: TunnelState, *, error: str = "", hint: str = "",
             next_retry_at: float | None = None) -> Moment:
        if not self.allowed(target):
            raise IllegalMoveError(f"tunnel state {self.state.value} -> {target.value} is not allowed")
        since = self.now.since if target == self.state else self._clock.time()
        self.now = Moment(target, since, error, hint, next_retry_at)
        return self.now


# ---- retry schedule --------------------------------------------------------------------------

class RetrySchedule:
    """When to try again: the first retry after losing an upstream that had proven itself (a
    health probe passed) is immediate, then ``timing.Backoff`` (initial, doubling, +-20 %
    jitter, capped). An upstream that connects but never proves itself counts as a failure,
    so a bastion that accepts and drops at once backs off instead of spinning."""

    def __init__(self, settings: TunnelSettings, rnd: Callable[[], float] = random.random) -> None:
        self._backoff = Backoff(initial=settings.backoff_initial, maximum=settings.backoff_max)
        self._rnd = rnd
        self.failures = 0
        self._proven = False

    def connected(self) -> None:
        self._proven = False

    def proven(self) -> None:
        self.failures = 0
        self._proven = True

    def immediate(self) -> bool:
        """After losing an upstream: retry at once only if it had proven itself."""
        return self._proven

    def failed(self) -> float:
        """Record a failure; the delay before the next attempt."""
        self._proven = False
        delay = self._backoff.delay(self.failures, self._rnd())
        self.failures += 1
        return delay


# ---- MySQL greeting probe --------------------------------------------------------------------

@dataclass(frozen=True)
class ProbeResult:
    ok: bool                      # a MySQL greeting (protocol 10) came back
    detail: str = ""              # server version, or the server's error
    code: int = 0                 # the server's error code when it refused


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
        _close(chan)
    return _parse_first_packet(payload, host, port)


def _parse_first_packet(payload: bytes, host: str, port: int) -> ProbeResult:
    if payload[:1] == b"\x0a":
        return ProbeResult(True, payload[1:].split(b"\0", 1)[0].decode(errors="replace"))
    if payload[:1] == b"\xff" and len(payload) >= 3:
        code = struct.unpack("<H", payload[1:3])[0]
        text = payload[3:]
        text = text[6:] if text[:1] == b"#" else text
        return ProbeResult(False, text.decode(errors="replace"), code)
    raise TransientError(f"{host}:{port} answered, but not with a MySQL greeting (first byte {payload[:1].hex() or 'none'})")


def _read_exact(chan: Any, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = chan.recv(n - len(buf))
        if not chunk:
            raise EOFError("closed before the greeting")
        buf += chunk
    return buf


# What a client of a tunnel that cannot reach its database sees instead of the greeting: a
# server-range ERR packet. 1105 ER_UNKNOWN_ERROR (SQLSTATE HY000) is the server's code for "the
# text says what went wrong"; a specific one (1040 too many connections, 1129 host blocked, 1130
# host not allowed) would send users and the retry rules of their tools down a wrong path, and a
# client-range code (2003) is rejected by libmariadb as a malformed packet (the mariadb CLI then
# prints "ERROR 2027 Received malformed packet" instead of the text).
REFUSED_CODE = 1105
REFUSED_SQLSTATE = "HY000"


def mysql_error_packet(message: str, code: int = REFUSED_CODE, sqlstate: str = REFUSED_SQLSTATE,
                       sequence: int = 0) -> bytes:
    """A MySQL ERR packet: 0xff, the error code, ``#`` + 5-byte SQLSTATE, the text. Sent instead of
    the server greeting it has sequence id 0 (the greeting's)."""
    if 2000 <= code < 3000 or not 1000 <= code < 65535:
        raise ValueError(f"{code} is not a server error code (2000-2999 are client codes)")
    if len(sqlstate) != 5 or not sqlstate.isascii():
        raise ValueError(f"SQLSTATE must be 5 ASCII characters, not {sqlstate!r}")
    payload = b"\xff" + struct.pack("<H", code) + b"#" + sqlstate.encode() + message.encode("utf-8", "replace")[:500]
    return struct.pack("<I", len(payload))[:3] + bytes([sequence & 0xFF]) + payload


REFUSED_HINTS = {
    1129: "the cluster blocked the bastion after too many aborted connects: run FLUSH HOSTS on it "
          "and raise max_connect_errors in its parameter group",
    1040: "the cluster has too many connections; close idle sessions or raise max_connections",
}
# A client that arrives while the upstream has been failing this long (or never came up) gets
# the error as soon as one more attempt fails, instead of waiting ``connect_wait``; a shorter
# outage (a bastion restarting) is waited through.
PROMPT_REFUSAL_AFTER = 5.0
FAILURE_LOG_INTERVAL = 60.0       # a failure that repeats is logged at most this often
# moves a retry loop makes on every attempt: logged at DEBUG (the failure line says it all)
RETRY_CYCLE = {(S.BACKOFF, S.CONNECTING), (S.BACKOFF, S.RECONNECTING), (S.CONNECTING, S.BACKOFF),
               (S.RECONNECTING, S.BACKOFF)}


# ---- the unit --------------------------------------------------------------------------------

Probe = Callable[[Transport, str, int, float], ProbeResult]
BeforeRelay = Callable[[socket.socket, Any], "socket.socket | Handoff | None"]
CREDENTIALS_RECHECK = 2.0         # waiting_credentials re-asks the prerequisite this often


class Tunnel:
    """127.0.0.1:``local_port`` -> (transport) -> ``remote_host``:``remote_port``.

    ``prerequisite`` (optional) is asked before each (re)connect: False means "wait for
    credentials" (state waiting_credentials; ``check_now()`` when they arrive skips the wait);
    it may raise dbtunneld errors (sign-in needed, ...). ``on_change`` is called after every
    state move, outside the unit's locks (connection counts are read with ``status()``).
    ``local_port=0`` binds an ephemeral port (tests). ``before_relay(client, channel)`` (optional)
    runs once per connection on the fresh channel before any byte is relayed (the local login,
    ``local_login.LocalLogin``) and returns the socket to relay (the client, or one that stands for
    it), or a ``command_watch.Handoff`` (that socket and a watch on its upload); None ends the
    connection (it has told the client why).
    """

    def __init__(self, name: str, local_port: int, remote_host: str, remote_port: int,
                 transport: Transport, settings: TunnelSettings = TunnelSettings(), *,
                 clock: Clock = SYSTEM_CLOCK, prerequisite: Callable[[], bool] | None = None,
                 on_change: Callable[[TunnelStatus], None] | None = None, probe: Probe = probe_mysql,
                 rnd: Callable[[], float] = random.random, refuse_as_mysql: bool = True,
                 before_relay: BeforeRelay | None = None) -> None:
        self.name = name
        self.local_port = local_port
        self.remote = (remote_host, remote_port)
        self.transport = transport
        self.settings = settings
        self._clock = clock
        self._prerequisite = prerequisite
        self._on_change = on_change
        self._probe = probe
        self._refuse_as_mysql = refuse_as_mysql
        self._before_relay = before_relay
        self._log = unit_logger(log, tunnel=name)
        self._cond = threading.Condition()
        self._machine = StateMachine(clock)
        self._retry = RetrySchedule(settings, rnd)
        self._wake = threading.Event()
        self._reasons: set[str] = set()
        self._generation = 0              # id of the current upstream; bumped when it is dropped
        self._checks = 0                  # completed upstream checks (clients wait on it)
        self._ever_up = False
        self._waiting_clients = 0
        self._last_attempt = float("-inf")
        self._next_ping = self._next_probe = 0.0
        self._clients_since_probe = 0
        self._probed = False              # the current upstream passed a probe already
        self._pipes: set[forward.Link] = set()
        self._bytes_down = 0              # received by pipes that have ended
        self._counts = {"open": 0, "total": 0, "reconnects": 0}
        self._serial = itertools.count(1)
        self._workers = _Workers(f"tunnel-{name}")
        # this tunnel's threads all run on one CPU, where the transport allows it
        self._cpu = data_path_cpu() if transport.pin_data_path else None
        self._listener: socket.socket | None = None
        self._acceptor: _Acceptor | None = None
        self._forwarder: forward.Forwarder | None = None
        self._keeper: threading.Thread | None = None
        self._run: object | None = None   # the current run's token; None while stopped
        self._keeper_local = threading.local()   # .run: the run a keeper thread belongs to
        self._connecting = threading.Lock()
        self._failed_attempts = 0         # connects that failed into backoff (clients wait on it)
        self._trouble_since: float | None = None   # when the tunnel last left ``up`` (or started)
        self._failure_log = RepeatLimiter(FAILURE_LOG_INTERVAL)
        self._refusal_log = RepeatLimiter(FAILURE_LOG_INTERVAL)

    # ---- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Bind the port and start keeping the upstream. Idempotent; a busy port -> failed state
        (call ``start`` or ``retry`` again once it is free)."""
        with self._cond:
            if self._run is not None:
                return
        try:
            self._bind()
        except PortInUseError as exc:
            self._log.warning("cannot listen: %s", exc.message)
            self._move(S.FAILED, error=exc.message, hint=exc.hint)
            return
        run = object()
        forwarder = forward.Forwarder(f"tunnel-{self.name}-forward", on_start=lambda: pin_this_thread(self._cpu))
        forwarder.start()
        with self._cond:
            self._run = run
            self._forwarder = forwarder
        self._move(S.CONNECTING)
        self._keeper = threading.Thread(target=self._keep, args=(run,), name=f"tunnel-{self.name}",
                                        daemon=True)
        self._keeper.start()
        self._log.info("listening on 127.0.0.1:%d -> %s:%d (%s)", self.local_port, *self.remote,
                       self.transport.kind)

    def stop(self, timeout: float = 5.0) -> None:
        """Close the listener, every client connection and the upstream. Idempotent."""
        with self._cond:
            self._run = None
            keeper, self._keeper = self._keeper, None
            self._cond.notify_all()
        self._kick("stop")
        if self._acceptor is not None:
            self._acceptor.close()
            self._acceptor = None
        if self._listener is not None:
            self._listener.close()
            self._listener = None
        self.transport.close()
        self._abort_pipes(lambda pipe: True)
        with self._cond:
            forwarder, self._forwarder = self._forwarder, None
        if forwarder is not None:
            forwarder.close()
        if keeper is not None and keeper is not threading.current_thread():
            keeper.join(timeout)
        if self.state != S.STOPPED:
            self._move(S.STOPPED)
            self._log.info("stopped")

    def retry(self) -> None:
        """Try again now: after a busy port, a sign-in, a fixed host key, or during backoff."""
        if self._run is None:
            self.start()
        else:
            self.check_now()

    def check_now(self) -> None:
        """Check the upstream at once (after sleep/wake, new credentials, or a user's click)."""
        self._kick("check")

    def reconnect(self) -> None:
        """Rebuild the upstream now even if it looks healthy (the listener stays bound)."""
        self._kick("rebuild")

    def __enter__(self) -> "Tunnel":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def state(self) -> TunnelState:
        return self._machine.state

    def status(self) -> TunnelStatus:
        with self._cond:
            now = self._machine.now
            counts = dict(self._counts)
        return TunnelStatus(name=self.name, local_port=self.local_port, state=now.state, since=now.since,
                            last_error=now.last_error, hint=now.hint, next_retry_at=now.next_retry_at,
                            transport=self.transport.kind, endpoint=f"{self.remote[0]}:{self.remote[1]}",
                            connections_open=counts["open"], connections_total=counts["total"],
                            reconnects=counts["reconnects"])

    # ---- state moves -------------------------------------------------------------------------

    def _move(self, target: TunnelState, **details: Any) -> None:
        with self._cond:
            keeper_run = getattr(self._keeper_local, "run", None)
            if keeper_run is not None and keeper_run is not self._run:
                return                           # a keeper of a stopped run: its news is stale
            before = self._machine.state
            self._machine.move(target, **details)
            self._note_trouble(target)
            self._cond.notify_all()
        if before != target:
            error = details.get("error")
            level = logging.DEBUG if (before, target) in RETRY_CYCLE else logging.INFO
            self._log.log(level, "%s -> %s%s", before.value, target.value, f" ({error})" if error else "")
        self._notify()

    def _note_trouble(self, target: TunnelState) -> None:
        """Under ``_cond``: when the current outage began (None while up)."""
        if target == S.UP:
            self._trouble_since = None
        elif self._trouble_since is None:
            self._trouble_since = self._clock.time()

    def _notify(self) -> None:
        if self._on_change is not None:
            try:
                self._on_change(self.status())
            except Exception:
                self._log.exception("status listener failed")

    def _bind(self) -> None:
        if self._listener is None:
            self._listener = ports.bind_listener(self.local_port)
            self.local_port = self._listener.getsockname()[1]
        self._acceptor = _Acceptor(self._listener, self._on_client, f"tunnel-{self.name}-accept", self._cpu)
        self._acceptor.start()

    # ---- the keeper: the one loop that connects, watches and retries --------------------------

    def _kick(self, reason: str) -> None:
        with self._cond:
            self._reasons.add(reason)
        self._wake.set()

    def _take_reasons(self) -> set[str]:
        with self._cond:
            reasons, self._reasons = self._reasons, set()
            self._wake.clear()
            return reasons

    def _keep(self, run: object) -> None:
        pin_this_thread(self._cpu)           # the upstream's threads (SSH reader, pings) inherit it
        self._keeper_local.run = run
        steps = {S.CONNECTING: self._attempt, S.RECONNECTING: self._attempt, S.UP: self._watch,
                 S.BACKOFF: self._wait_backoff, S.WAITING_CREDENTIALS: self._wait_credentials,
                 S.FAILED: self._wait_user, S.NEEDS_SIGN_IN: self._wait_user}
        while self._run is run:
            step = steps.get(self.state)
            if step is None:
                return
            try:
                step(run)
            except Exception:   # a bug must not kill the unit silently
                self._log.exception("keeper step failed in state %s", self.state.value)
                self._clock.wait(self._wake, 1.0)

    def _attempt(self, run: object) -> None:
        self._last_attempt = self._clock.time()
        with self._connecting:     # one connect at a time, even with a keeper of a stopped run
            if self._run is not run:
                return
            try:
                if not self._credentials_ready():
                    return
                self.transport.connect()
            except Exception as exc:
                if self._run is run:
                    self._fail(exc)
                return
            if self._run is not run:
                self.transport.close()           # stopped meanwhile: drop what we just built
                return
        self._went_up()

    def _credentials_ready(self) -> bool:
        if self._prerequisite is None or self._prerequisite():
            return True
        if self.state != S.WAITING_CREDENTIALS:
            self._move(S.WAITING_CREDENTIALS, hint="waiting for database credentials")
        return False

    def _went_up(self) -> None:
        with self._cond:
            self._generation += 1
            generation = self._generation
            if self._ever_up:
                self._counts["reconnects"] += 1
            self._ever_up = True
        self._refusal_log.reset()
        held = self._failure_log.reset()
        if held:
            self._log.info("up again (%d failed attempt%s not logged one by one)", held, "s" if held != 1 else "")
        self._retry.connected()
        now = self._clock.time()
        self._next_ping = now + self.transport.ping_interval(self.settings.keepalive_interval)
        self._next_probe = now                   # prove the path to the database at once
        self._probed = False
        threading.Thread(target=self._watch_death, args=(generation,), daemon=True,
                         name=f"tunnel-{self.name}-upstream-{generation}").start()
        self._move(S.UP)

    def _watch_death(self, generation: int) -> None:
        self.transport.wait_closed()
        if generation == self._generation:
            self._kick("died")

    def _fail(self, exc: BaseException) -> None:
        error = exc if isinstance(exc, DbtunneldError) else TransientError(f"{type(exc).__name__}: {exc}")
        if isinstance(error, SignInNeededError):
            self._move(S.NEEDS_SIGN_IN, error=error.message, hint=error.hint)
        elif isinstance(error, NeedsUserError):
            self._move(S.FAILED, error=error.message, hint=error.hint)
        else:
            delay = self._retry.failed()
            with self._cond:
                self._failed_attempts += 1
            self._log_failure(error.message, delay)
            self._move(S.BACKOFF, error=error.message, hint=error.hint or "dbtunneld retries by itself",
                       next_retry_at=self._clock.time() + delay)

    def _log_failure(self, message: str, delay: float) -> None:
        """One WARNING per new error, then one a minute with the count: what really happens (clients
        that wait make the keeper try every ``backoff_initial`` s instead of after ``delay``)."""
        held = self._failure_log.admit(message)
        if held is None:
            return
        also = f"; {held} more failed attempt{'s' if held != 1 else ''} since the last such line" if held else ""
        self._log.warning("%s; next try in %.1f s, or every %g s while a client waits%s",
                          message, delay, self.settings.backoff_initial, also)

    def _reconnect_state(self) -> TunnelState:
        return S.RECONNECTING if self._ever_up else S.CONNECTING

    def _watch(self, run: object) -> None:
        """While up: keepalive pings and greeting probes on schedule, or at once when kicked."""
        due = min(self._next_ping, self._next_probe) - self._clock.time()
        if due > 0:
            self._clock.wait(self._wake, due)
        reasons = self._take_reasons()
        if self._run is not run or self.state != S.UP:
            return
        try:
            self._check_upstream(reasons)
        finally:
            with self._cond:
                self._checks += 1
                self._cond.notify_all()

    def _check_upstream(self, reasons: set[str]) -> None:
        s, now = self.settings, self._clock.time()
        if "rebuild" in reasons:
            self._log.info("rebuilding the upstream on request")
            self._drop_upstream()
            return self._move(self._reconnect_state())
        if "died" in reasons or not self.transport.is_alive():
            return self._lost(self.transport.why_closed() or "the connection to the bastion closed")
        if reasons & {"check", "suspect"} or now >= self._next_ping:
            self._next_ping = now + self.transport.ping_interval(s.keepalive_interval)
            flowed = self._traffic()
            if not self.transport.ping(s.health_timeout):
                if self._traffic() != flowed:   # late, but bytes are arriving: busy, not dead
                    self._log.info("keepalive answer late while data flows; the upstream is alive")
                else:
                    return self._lost(f"the bastion did not answer a keepalive within {s.health_timeout:g} s")
        if reasons & {"check", "suspect"} or now >= self._next_probe:
            self._next_probe = now + s.health_interval
            if self._probe_due(reasons):
                self._check_database()

    def _probe_due(self, reasons: set[str]) -> bool:
        """The greeting probe ends in an aborted handshake, which MySQL counts against the
        bastion's address (max_connect_errors, shared by every developer behind that bastion;
        only a successful login resets it). So it runs after each (re)connect, when asked, and
        periodically only while clients are logging in between probes; an idle tunnel relies on
        SSH keepalives, and the next client's channel open tests the path to the database."""
        with self._cond:
            clients, self._clients_since_probe = self._clients_since_probe, 0
        return bool(reasons & {"check", "suspect"}) or clients > 0 or not self._probed

    def _traffic(self) -> int:
        """Bytes received from the upstream so far (evidence of life while a keepalive is late)."""
        with self._cond:
            return self._bytes_down + sum(p.received for p in self._pipes)

    def _check_database(self) -> None:
        host, port = self.remote
        flowed = self._traffic()
        try:
            result = self._probe(self.transport, host, port, self.settings.health_timeout)
        except NeedsUserError as exc:
            self._drop_upstream()
            self._move(S.FAILED, error=exc.message, hint=exc.hint)
            return
        except (DbtunneldError, OSError) as exc:
            if self._traffic() != flowed:
                self._log.info("health probe failed while data flows (%s); trying again later", exc)
                return
            return self._lost(str(exc))
        self._retry.proven()
        self._probed = True
        if result.ok:
            if self._machine.now.last_error:
                self._move(S.UP)
            return
        error = f"MySQL at {host}:{port} answers but refuses connections: {result.code} {result.detail}"
        self._log.warning(error)
        self._move(S.UP, error=error, hint=REFUSED_HINTS.get(result.code, "see the cluster's error log"))

    def _lost(self, why: str) -> None:
        self._drop_upstream()
        if self._retry.immediate():
            self._log.warning("upstream lost (%s); reconnecting now", why)
            self._move(self._reconnect_state(), error=why)
            return
        self._fail(TransientError(f"upstream lost: {why}"))

    def _drop_upstream(self) -> None:
        with self._cond:
            generation = self._generation
            self._generation += 1               # clients of the old upstream wait for a new one
        self.transport.close()      # first: it wakes any thread blocked writing to a dead bastion
        self._abort_pipes(lambda pipe: pipe.generation <= generation)

    def _wait_backoff(self, run: object) -> None:
        now = self._clock.time()
        retry_at = self._machine.now.next_retry_at or now
        if self._waiting_clients:                # a client is waiting: don't make it wait long
            retry_at = min(retry_at, self._last_attempt + self.settings.backoff_initial)
        if retry_at > now:
            self._clock.wait(self._wake, retry_at - now)
            reasons = self._take_reasons()
            if not reasons & {"check", "rebuild"} and self._clock.time() < retry_at:
                return                           # woken early (a client, a stop): look again
        if self._run is run and self.state == S.BACKOFF:
            self._move(self._reconnect_state(), error=self._machine.now.last_error)

    def _wait_credentials(self, run: object) -> None:
        self._clock.wait(self._wake, CREDENTIALS_RECHECK)
        self._take_reasons()
        if self._run is not run or self.state != S.WAITING_CREDENTIALS:
            return
        try:
            ready = self._credentials_ready()
        except Exception as exc:
            return self._fail(exc)
        if ready:
            self._move(self._reconnect_state())

    def _wait_user(self, run: object) -> None:
        self._clock.wait(self._wake, float("inf"))
        reasons = self._take_reasons()
        if reasons & {"check", "rebuild"} and self._run is run and self.state in (S.FAILED, S.NEEDS_SIGN_IN):
            self._move(S.CONNECTING)

    # ---- clients -----------------------------------------------------------------------------

    def _on_client(self, client: socket.socket) -> None:
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._cond:
            self._counts["open"] += 1
            self._counts["total"] += 1
            self._clients_since_probe += 1
        number = next(self._serial)
        self._workers.run(self._serve, client, number)

    def _serve(self, client: socket.socket, number: int) -> None:
        """On a pooled thread: open the client's channel, then hand both to the forwarding loop."""
        forwarding = False
        try:
            if self._before_relay is None and self.transport.adopts_clients:
                forwarding = self._adopt(client)
                return
            opened = self._open_for_client(time.monotonic() + self.settings.connect_wait)
            if isinstance(opened, str):
                self._refuse(client, opened)
                return
            relay = self._ready_to_relay(client, opened[0])
            if relay is None:
                return
            handoff = relay if isinstance(relay, Handoff) else Handoff(relay)
            client = handoff.client
            chan = opened[0] if handoff.server is None else handoff.server
            forwarding = self._forward(client, chan, opened[1], f"[tunnel={self.name}] conn-{number}",
                                       handoff.commands)
        finally:
            if not forwarding:
                _close(client)
                with self._cond:
                    self._counts["open"] -= 1

    def _adopt(self, client: socket.socket) -> bool:
        """The transport forwards ``client`` itself (``Transport.adopts_clients``); True once it does."""
        opened = self._open_for_client(time.monotonic() + self.settings.connect_wait, client)
        if isinstance(opened, str):
            self._refuse(client, opened)
            return False
        handle, handle.generation = opened[0], opened[1]
        _close(client)                              # the transport holds its own copy
        with self._cond:
            self._pipes.add(handle)
            stale = handle.generation != self._generation or self._run is None
        handle.on_end(self._link_ended)
        if stale:
            handle.abort()
        return True

    def _ready_to_relay(self, client: socket.socket, chan: Any) -> socket.socket | Handoff | None:
        """The ``before_relay`` step (the one seam between accepting and relaying)."""
        if self._before_relay is None:
            return client
        try:
            relay = self._before_relay(client, chan)
            if relay is not None:
                return relay
        except Exception:
            self._log.exception("before_relay failed")
        _close(chan)
        return None

    def _forward(self, client: socket.socket, chan: Any, generation: int, label: str,
                 commands: CommandWatch | None = None) -> bool:
        """True when the forwarding loop took the connection (it ends it: ``_link_ended``)."""
        try:
            upstream = forward.upstream_for(chan)
        except TypeError as exc:
            self._log.error("%s: %s", label, exc)
            _close(chan)
            return False
        with self._cond:
            forwarder = self._forwarder
            if forwarder is None:                # stopping
                _close(chan)
                return False
            link = forwarder.add(client, upstream, self._link_ended, label, generation, commands)
            if not link.ended:                  # (a loop that has stopped ends it at once)
                self._pipes.add(link)
            stale = generation != self._generation
        if stale:                               # the upstream was dropped while we opened
            link.abort()
        return True

    def _link_ended(self, link: forward.Link) -> None:
        with self._cond:
            self._pipes.discard(link)
            self._bytes_down += link.received
            self._counts["open"] -= 1

    def _open_for_client(self, deadline: float, adopt: socket.socket | None = None) -> tuple[Any, int] | str:
        """A channel for one client (or the transport's handle on ``adopt``), waiting through
        rebuilds; or why there is none."""
        seen, checks = -1, -1
        while True:
            got = self._await_up(deadline, seen, checks)
            if isinstance(got, str):
                return got
            generation, checks = got
            try:
                if adopt is not None:
                    return self.transport.adopt(adopt, *self.remote, self._channel_timeout(deadline)), generation
                return self.transport.open_channel(*self.remote, timeout=self._channel_timeout(deadline)), generation
            except (DbtunneldError, OSError) as exc:
                if isinstance(exc, NeedsUserError) or _remote_refused(exc):
                    self._kick("check")
                    return exc.one_line() if isinstance(exc, DbtunneldError) else str(exc)
                self._log.info("channel open failed (%s); checking the upstream", exc)
                self._kick("suspect")
                seen = generation

    def _channel_timeout(self, deadline: float) -> float:
        return max(0.5, min(self.settings.health_timeout, deadline - time.monotonic()))

    def _await_up(self, deadline: float, failed_on: int, checks: int) -> tuple[int, int] | str:
        """Wait until the tunnel is up on an upstream other than ``failed_on``, or that one
        passed a check after the failure; return (upstream id, checks) or why not."""
        with self._cond:
            self._waiting_clients += 1
            failures_seen = self._failed_attempts
            try:
                while True:
                    state = self._machine.state
                    if self._run is None:
                        return "the tunnel is stopping"
                    if state in (S.FAILED, S.NEEDS_SIGN_IN):
                        return self._describe_trouble()
                    if state == S.BACKOFF and self._failed_attempts > failures_seen and self._cannot_come_up():
                        return self._describe_trouble()
                    if state == S.UP and (self._generation != failed_on or self._checks > checks):
                        return self._generation, self._checks
                    left = deadline - time.monotonic()
                    if left <= 0:
                        return self._describe_trouble()
                    if state == S.BACKOFF:
                        self._reasons.add("client")
                        self._wake.set()
                    self._cond.wait(min(left, 1.0))
            finally:
                self._waiting_clients -= 1

    def _cannot_come_up(self) -> bool:
        """Under ``_cond``: never up in this process, or down for PROMPT_REFUSAL_AFTER already: a
        client then gets the error once one more attempt fails, not after ``connect_wait``."""
        since = self._trouble_since
        return not self._ever_up or (since is not None and self._clock.time() - since >= PROMPT_REFUSAL_AFTER)

    def _describe_trouble(self) -> str:
        now = self._machine.now
        text = f"dbtunneld: tunnel {self.name!r} is {now.state.value.replace('_', ' ')}"
        if now.last_error:
            text += f": {now.last_error}"
        if now.hint:
            text += f" (hint: {now.hint})"
        return text

    def _refuse(self, client: socket.socket, why: str) -> None:
        held = self._refusal_log.admit(why)
        if held is not None:
            self._log.info("client refused: %s%s", why, f" ({held} more refused with it since the last such line)" if held else "")
        if self._refuse_as_mysql:
            try:
                client.sendall(mysql_error_packet(why))
            except OSError:
                pass

    def _abort_pipes(self, which: Callable[[forward.Link], bool]) -> None:
        with self._cond:
            doomed = [p for p in self._pipes if which(p)]
        for pipe in doomed:
            pipe.abort()


def _remote_refused(exc: BaseException) -> bool:
    """The bastion is fine but the database end refused (so waiting for a rebuild won't help)."""
    from .ssh import ChannelOpenError
    return isinstance(exc, ChannelOpenError)


# ---- the listener ----------------------------------------------------------------------------

class _Acceptor:
    """Accepts on the listener in its own thread; sleeps in select() until a client or close()."""

    def __init__(self, listener: socket.socket, on_client: Callable[[socket.socket], None], name: str,
                 cpu: int | None = None) -> None:
        self._listener = listener
        self._on_client = on_client
        self._cpu = cpu
        self._wake_r, self._wake_w = socket.socketpair()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        pin_this_thread(self._cpu)           # the connection threads it starts inherit it
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        self._listener.setblocking(False)
        try:
            while not self._closed:
                for key, _ in sel.select():
                    if key.fileobj is self._wake_r:
                        return
                    self._accept_ready()
        finally:
            sel.close()

    def _accept_ready(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:     # EMFILE and friends: don't spin
                log.warning("accept failed: %s", exc)
                threading.Event().wait(0.1)
                return
            client.setblocking(True)
            self._on_client(client)

    def close(self) -> None:
        self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._wake_r.close()
        self._wake_w.close()


# ---- threads: channel opens, CPU affinity -------------------------------------------------------

# Every thread of one tunnel runs on one CPU (Linux: threads inherit the affinity of the thread
# that starts them, so pinning the keeper, the acceptor and the forwarding loop covers the SSH
# reader, the pings and the threads that open channels). The data path hands the GIL back and
# forth between the SSH reader and the forwarding loop; across two CPUs every
# hand-off is a cross-CPU wake-up: with 4 busy connections sysbench oltp_read_only went from
# ~320 to ~470 tps (p95 17 -> 11 ms, forwarder CPU per query 134 -> 77 us) when pinned
# (bench/concurrency_probe.py --sysbench). Tunnels take CPUs in turn.
# DBTUNNELD_PIN_THREADS=0 turns it off.
_CPU_TURNS = itertools.count()


def data_path_cpu() -> int | None:
    """The CPU for the next tunnel's threads, or None where threads cannot (or must not) be pinned."""
    if not hasattr(os, "sched_setaffinity") or os.environ.get("DBTUNNELD_PIN_THREADS") == "0":
        return None
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except OSError:
        return None
    return cpus[next(_CPU_TURNS) % len(cpus)] if len(cpus) > 1 else None


def pin_this_thread(cpu: int | None) -> None:
    if cpu is None:
        return
    try:
        os.sched_setaffinity(0, {cpu})       # 0: the calling thread
    except OSError as exc:                   # e.g. the CPU went offline: run unpinned
        log.debug("cannot pin %s to CPU %d: %s", threading.current_thread().name, cpu, exc)


WORKER_IDLE_SECONDS = 5.0


class _Workers:
    """Threads kept for reuse to open the channels of new connections (an open waits for the
    bastion; clients opening at once must not wait on each other). Handing a job to an idle
    thread is one wake-up; starting a thread costs a start handshake (0.1-0.2 ms on the path of
    every new connection). A thread idle for ``idle`` seconds ends (no periodic wake-ups); the
    bytes of open connections never need one (``forward.Forwarder``)."""

    def __init__(self, name: str, idle: float = WORKER_IDLE_SECONDS) -> None:
        self.name = name
        self.idle = idle
        self._lock = threading.Lock()
        self._resting: list[_Worker] = []
        self._serial = itertools.count(1)

    def run(self, fn: Callable[..., Any], *args: Any) -> threading.Event:
        """Run ``fn(*args)`` on a thread of the pool; the event is set when it returns."""
        done = threading.Event()
        with self._lock:
            worker = self._resting.pop() if self._resting else None
        if worker is None:
            worker = _Worker(self, f"{self.name}-worker-{next(self._serial)}")
        worker.give(fn, args, done)
        return done

    def rest(self, worker: "_Worker") -> None:
        with self._lock:
            self._resting.append(worker)

    def retire(self, worker: "_Worker") -> bool:
        """True when ``worker`` may end (it was resting and nobody just gave it a job)."""
        with self._lock:
            if worker in self._resting:
                self._resting.remove(worker)
                return True
            return False


class _Worker:
    def __init__(self, pool: _Workers, name: str) -> None:
        self._pool = pool
        self._job: tuple[Callable[..., Any], tuple, threading.Event] | None = None
        self._given = threading.Event()
        threading.Thread(target=self._loop, name=name, daemon=True).start()

    def give(self, fn: Callable[..., Any], args: tuple, done: threading.Event) -> None:
        self._job = (fn, args, done)
        self._given.set()

    def _loop(self) -> None:
        while True:
            if not self._given.wait(self._pool.idle):
                if self._pool.retire(self):
                    return
                continue                          # a job is being handed over right now
            self._given.clear()
            fn, args, done = self._job
            self._job = None
            try:
                fn(*args)
            except Exception:
                log.exception("%s: a connection job failed", threading.current_thread().name)
            finally:
                done.set()
            self._pool.rest(self)


def _close(stream: Any) -> None:
    try:
        stream.close()
    except Exception:
        pass
