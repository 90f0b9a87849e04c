"""The tunnel unit with a scripted transport: state table, backoff on an injected clock,
clients waiting through rebuilds, refusals that say why, ports, prerequisites."""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time

import pytest

from dbtunneld.adapters.mysqlwire import ProbeResult, mysql_error_packet
from dbtunneld.adapters.ports import bind_listener
from dbtunneld.adapters.transport import Transport
from dbtunneld.core.config import TunnelSettings
from dbtunneld.core.errors import HostKeyError, PortInUseError, SignInNeededError, TransientError
from dbtunneld.core.model import TunnelState
from dbtunneld.core.timing import FakeClock
from dbtunneld.engine.tunnel import Tunnel
from dbtunneld.engine.tunnel_clients import data_path_cpu
from dbtunneld.engine.tunnel_health import probe_mysql
from dbtunneld.engine.tunnel_state import TRANSITIONS, IllegalMoveError, Moment, RetrySchedule, StateMachine
from tunnel_servers import GreetingEchoServer, mysql_error, mysql_greeting

S = TunnelState


def eventually(predicate, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.005)
    raise AssertionError(f"timed out waiting for {what}")


# ---- state table ---------------------------------------------------------------------------

ALL_MOVES = [(a, b) for a in S for b in S if a != b]


@pytest.mark.parametrize("a, b", ALL_MOVES, ids=[f"{a.value}->{b.value}" for a, b in ALL_MOVES])
def test_every_move_is_allowed_or_rejected_by_the_table(a, b):
    clock = FakeClock()
    machine = StateMachine(clock)
    machine.now = Moment(a, since=1.0)
    if b in TRANSITIONS[a]:
        clock.advance(5)
        moment = machine.move(b, error="e", hint="h", next_retry_at=3.0)
        assert (moment.state, moment.since, moment.last_error, moment.hint, moment.next_retry_at) == \
            (b, clock.time(), "e", "h", 3.0)
    else:
        with pytest.raises(IllegalMoveError):
            machine.move(b)
        assert machine.state == a


def test_the_table_covers_every_state_and_each_can_stop():
    assert set(TRANSITIONS) == set(S)
    assert all(S.STOPPED in targets for state, targets in TRANSITIONS.items() if state != S.STOPPED)
    assert S.UP not in TRANSITIONS[S.STOPPED]          # never up without connecting
    assert S.UP not in TRANSITIONS[S.BACKOFF]          # nor straight out of backoff


def test_staying_refreshes_details_but_keeps_since():
    clock = FakeClock()
    machine = StateMachine(clock)
    machine.move(S.CONNECTING)
    since = machine.now.since
    clock.advance(3)
    machine.move(S.CONNECTING, error="still trying")
    assert machine.now.since == since and machine.now.last_error == "still trying"


# ---- retry schedule (pure) -------------------------------------------------------------------

def test_retry_schedule_doubles_to_the_cap_and_starts_afresh_when_proven():
    sched = RetrySchedule(TunnelSettings(backoff_initial=0.5, backoff_max=30), rnd=lambda: 0.5)
    assert not sched.immediate()                 # nothing proven yet
    delays = [sched.failed() for _ in range(9)]
    assert delays == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    sched.connected()
    assert not sched.immediate()                 # connected is not proven
    sched.proven()
    assert sched.immediate() and sched.failed() == 0.5
    assert not sched.immediate()


def test_retry_jitter_stays_within_twenty_percent():
    for rnd in (0.0, 0.25, 0.999):
        sched = RetrySchedule(TunnelSettings(backoff_initial=1.0, backoff_max=30), rnd=lambda r=rnd: r)
        sched.failed()
        assert 1.6 <= sched.failed() <= 2.4


# ---- a scripted transport ----------------------------------------------------------------------

class ScriptedTransport(Transport):
    """Connects (or fails as told), opens real TCP channels to a local server, dies on demand."""

    kind = "scripted"

    def __init__(self, server_port: int, clock=None) -> None:
        self.server_port = server_port
        self.clock = clock
        self.failures: list[BaseException] = []     # raised by the next connects, in order
        self.fail_always: BaseException | None = None
        self.gate = threading.Event()
        self.gate.set()
        self.attempts: list[float] = []
        self.alive = False
        self._dead = threading.Event()
        self.pings = 0
        self.ping_answers = True
        self.channels: list[socket.socket] = []
        self.lock = threading.Lock()

    def connect(self) -> None:
        self.attempts.append(self.clock.time() if self.clock else time.monotonic())
        self.gate.wait(30)
        if self.fail_always is not None:
            raise self.fail_always
        if self.failures:
            raise self.failures.pop(0)
        self._dead = threading.Event()
        self.alive = True

    def open_channel(self, host, port, timeout):
        if not self.alive:
            raise TransientError("scripted: not connected")
        chan = socket.create_connection(("127.0.0.1", self.server_port), timeout=timeout)
        chan.settimeout(None)
        with self.lock:
            self.channels.append(chan)
        return chan

    def is_alive(self) -> bool:
        return self.alive

    def ping(self, timeout: float) -> bool:
        self.pings += 1
        if self.alive and not self.ping_answers:
            self._dead.wait(timeout)                   # no answer: the caller waits it out
        return self.alive and self.ping_answers

    def wait_closed(self, timeout=None) -> bool:
        return self._dead.wait(timeout)

    def die(self) -> None:
        """The bastion goes away underneath (channels drop, the watcher notices)."""
        self.alive = False
        with self.lock:
            chans, self.channels = self.channels, []
        for c in chans:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._dead.set()

    def close(self) -> None:
        self.die()


@pytest.fixture
def echo():
    server = GreetingEchoServer()
    yield server
    server.close()


FAST = TunnelSettings(connect_wait=10, health_interval=60, health_timeout=2, keepalive_interval=60,
                      backoff_initial=0.2, backoff_max=2)


@pytest.fixture
def make(echo):
    made = []

    def factory(settings=FAST, **kw):
        transport = kw.pop("transport", None) or ScriptedTransport(echo.port, kw.get("clock"))
        t = Tunnel("orders", 0, "db.internal", 3306, transport, settings, **kw)
        made.append(t)
        return t, transport

    yield factory
    for t in made:
        t.stop()


def connect_and_greet(port: int, timeout: float = 15) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    header = recv_exact(sock, 4)
    payload = recv_exact(sock, int.from_bytes(header[:3], "little"))
    assert payload[:1] == b"\x0a", payload
    return sock


def recv_exact(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return buf


def test_client_flows_and_counts(make):
    t, _ = make()
    t.start()
    eventually(lambda: t.state == S.UP, what="up")
    sock = connect_and_greet(t.local_port)
    sock.sendall(b"ping")
    assert recv_exact(sock, 4) == b"ping"
    st = t.status()
    assert st.connections_open == 1 and st.connections_total == 1
    assert st.local_port == t.local_port and st.endpoint == "db.internal:3306" and st.transport == "scripted"
    sock.close()
    eventually(lambda: t.status().connections_open == 0, what="connection closed")


def test_half_close_passes_through(make):
    t, _ = make()
    with t:
        eventually(lambda: t.state == S.UP)
        sock = connect_and_greet(t.local_port)
        sock.sendall(b"x" * 100_000)
        sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := sock.recv(65536):
            got += chunk
        assert got == b"x" * 100_000
        sock.close()


def test_start_and_stop_are_idempotent_and_free_the_port(make):
    t, transport = make()
    t.start()
    t.start()
    eventually(lambda: t.state == S.UP)
    assert len(transport.attempts) == 1
    port = t.local_port
    t.stop()
    t.stop()
    assert t.state == S.STOPPED
    bind_listener(port).close()          # the port is free again


def test_restart_keeps_the_same_port(make):
    t, _ = make()
    t.start()
    port = t.local_port
    t.stop()
    t.start()
    assert t.local_port == port
    eventually(lambda: t.state == S.UP)


def test_client_during_rebuild_waits_then_flows(make):
    t, transport = make()
    t.start()
    eventually(lambda: t.state == S.UP)
    transport.gate.clear()                # the next connect hangs until released
    transport.die()
    eventually(lambda: t.state == S.RECONNECTING, what="reconnecting")
    result = {}

    def client():
        try:
            result["sock"] = connect_and_greet(t.local_port)
        except Exception as exc:
            result["error"] = exc

    th = threading.Thread(target=client)
    th.start()
    eventually(lambda: t.status().connections_open == 1, what="client accepted while rebuilding")
    assert "sock" not in result          # waiting, not refused
    transport.gate.set()
    th.join(15)
    assert "sock" in result, result
    result["sock"].close()
    assert t.status().reconnects == 1


def test_reconnect_rebuilds_a_healthy_upstream(make):
    t, transport = make()
    t.start()
    eventually(lambda: t.state == S.UP)
    t.reconnect()
    eventually(lambda: t.status().reconnects == 1 and t.state == S.UP, what="rebuilt")
    assert len(transport.attempts) == 2
    connect_and_greet(t.local_port).close()


def test_open_connections_drop_when_the_upstream_dies(make):
    t, transport = make()
    t.start()
    eventually(lambda: t.state == S.UP)
    sock = connect_and_greet(t.local_port)
    transport.die()
    sock.settimeout(10)
    assert sock.recv(10) == b""           # cut, so the client reconnects through the new upstream
    eventually(lambda: t.state == S.UP and transport.alive, what="back up")
    connect_and_greet(t.local_port).close()


def test_client_is_told_why_when_the_tunnel_cannot_come_up(make):
    t, transport = make(settings=TunnelSettings(connect_wait=0.5, backoff_initial=5, backoff_max=10))
    transport.fail_always = TransientError("bastion 10.0.0.5:22 unreachable")
    t.start()
    eventually(lambda: t.state == S.BACKOFF)
    sock = socket.create_connection(("127.0.0.1", t.local_port), timeout=10)
    data = sock.recv(1024)
    assert data[4] == 0xFF and b"unreachable" in data and b"backoff" in data
    sock.close()


def test_failed_state_refuses_at_once_with_the_hint(make):
    t, transport = make()
    transport.fail_always = HostKeyError("host key of bastion does not match", hint="verify and pin it")
    t.start()
    eventually(lambda: t.state == S.FAILED)
    st = t.status()
    assert "does not match" in st.last_error and st.hint == "verify and pin it"
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", t.local_port), timeout=10)
    data = sock.recv(1024)
    assert b"verify and pin it" in data
    assert time.monotonic() - started < FAST.connect_wait
    attempts = len(transport.attempts)
    time.sleep(0.3)
    assert len(transport.attempts) == attempts      # no retries behind the user's back
    transport.fail_always = None
    t.retry()
    eventually(lambda: t.state == S.UP, what="up after retry")


def test_sign_in_needed_is_its_own_state(make):
    t, transport = make()
    transport.fail_always = SignInNeededError("SSO session expired")
    t.start()
    eventually(lambda: t.state == S.NEEDS_SIGN_IN)
    transport.fail_always = None
    t.check_now()
    eventually(lambda: t.state == S.UP)


def test_busy_port_is_a_failed_state_naming_port_and_pid(make):
    holder = bind_listener(0)
    port = holder.getsockname()[1]
    try:
        t, _ = make()
        t.local_port = port
        t.start()
        st = t.status()
        assert st.state == S.FAILED
        assert str(port) in st.last_error and "pid" in st.last_error and "never moved" in st.hint
        assert t.local_port == port
    finally:
        holder.close()
    t.retry()                                         # the port is free now
    eventually(lambda: t.state == S.UP)
    assert t.local_port == port


def test_prerequisite_holds_the_tunnel_in_waiting_credentials(make):
    ready = threading.Event()
    t, transport = make(prerequisite=ready.is_set)
    t.start()
    eventually(lambda: t.state == S.WAITING_CREDENTIALS)
    assert transport.attempts == [] or len(transport.attempts) == 1 and not transport.alive
    ready.set()
    t.check_now()
    eventually(lambda: t.state == S.UP)


def test_prerequisite_errors_are_classified(make):
    def creds():
        raise SignInNeededError("AWS SSO session expired")

    t, _ = make(prerequisite=creds)
    t.start()
    eventually(lambda: t.state == S.NEEDS_SIGN_IN)
    assert "expired" in t.status().last_error


def test_on_change_sees_every_state(make):
    seen = []
    t, transport = make(on_change=lambda st: seen.append(st.state))
    t.start()
    eventually(lambda: t.state == S.UP)
    transport.die()
    eventually(lambda: seen.count(S.UP) >= 2)
    t.stop()
    states = list(dict.fromkeys(seen))
    assert states[:2] == [S.CONNECTING, S.UP] and S.RECONNECTING in states and seen[-1] == S.STOPPED


def test_context_manager(make):
    t, _ = make()
    with t as same:
        assert same is t
        eventually(lambda: t.state == S.UP)
    assert t.state == S.STOPPED


def test_clients_do_not_wait_on_each_other(make):
    t, _ = make()
    t.start()
    eventually(lambda: t.state == S.UP)
    slow = socket.create_connection(("127.0.0.1", t.local_port))   # never reads: must not block others
    socks = [connect_and_greet(t.local_port, timeout=10) for _ in range(20)]
    for i, s in enumerate(socks):
        s.sendall(bytes([i]) * 1000)
    for i, s in enumerate(socks):
        assert recv_exact(s, 1000) == bytes([i]) * 1000
        s.close()
    slow.close()


# ---- health: keepalive and probe ---------------------------------------------------------------

def test_unanswered_keepalive_rebuilds_the_upstream(make):
    t, transport = make(settings=TunnelSettings(keepalive_interval=1, health_interval=60, health_timeout=1,
                                                backoff_initial=0.2, backoff_max=1))
    t.start()
    eventually(lambda: t.state == S.UP)
    transport.ping_answers = False
    eventually(lambda: t.status().reconnects >= 1, what="rebuilt after a silent keepalive")
    transport.ping_answers = True
    eventually(lambda: t.state == S.UP)


def test_late_keepalive_while_data_flows_is_not_death(make):
    """A saturated link delays the keepalive answer; bytes arriving prove the bastion lives."""
    t, transport = make(settings=TunnelSettings(keepalive_interval=0.3, health_interval=60, health_timeout=0.3,
                                                backoff_initial=0.2, backoff_max=1))
    t.start()
    eventually(lambda: t.state == S.UP)
    sock = connect_and_greet(t.local_port)
    transport.ping_answers = False
    pings = transport.pings
    end = time.monotonic() + 2.0
    while time.monotonic() < end or transport.pings < pings + 3:
        sock.sendall(b"z" * 65536)
        recv_exact(sock, 65536)
    assert t.status().reconnects == 0 and t.state == S.UP
    sock.close()
    eventually(lambda: t.status().reconnects >= 1, what="silence then counts as death")


def test_idle_tunnels_do_not_keep_probing_the_database(make):
    """Each greeting probe is an aborted handshake MySQL counts against the bastion's address
    (max_connect_errors): probe after connecting, then only while clients log in."""
    probes = []

    def probe(*a):
        probes.append(time.monotonic())
        return ProbeResult(True, "8.0")

    t, _ = make(settings=TunnelSettings(health_interval=0.1, keepalive_interval=60, health_timeout=1),
                probe=probe)
    t.start()
    eventually(lambda: t.state == S.UP and len(probes) == 1, what="first probe")
    time.sleep(0.6)                                     # six intervals, idle
    assert len(probes) == 1
    connect_and_greet(t.local_port).close()
    eventually(lambda: len(probes) == 2, what="a probe after a client came")
    time.sleep(0.4)
    assert len(probes) == 2
    t.check_now()                                       # asked: always probes
    eventually(lambda: len(probes) == 3, what="probe on request")


def test_probe_refusal_keeps_the_tunnel_up_with_the_servers_error(make):
    answers = [ProbeResult(False, "Host '10.0.0.5' is blocked because of many connection errors", 1129)]
    t, _ = make(probe=lambda *a: answers[0])
    t.start()
    eventually(lambda: t.status().last_error)
    st = t.status()
    assert st.state == S.UP and "1129" in st.last_error and "FLUSH HOSTS" in st.hint
    answers[0] = ProbeResult(True, "8.0.mysql_aurora")
    t.check_now()
    eventually(lambda: not t.status().last_error, what="error cleared")


def test_probe_failure_on_a_fresh_upstream_backs_off(make):
    """A path that connects but never carries a greeting must not spin: it backs off."""
    def dead_end(*a):
        raise TransientError("no MySQL greeting from db.internal:3306")

    t, transport = make(probe=dead_end)
    t.start()
    eventually(lambda: t.state == S.BACKOFF, what="backoff")
    assert "greeting" in t.status().last_error and t.status().next_retry_at


# ---- backoff on an injected clock ----------------------------------------------------------

def test_backoff_schedule_on_a_fake_clock(echo):
    clock = FakeClock()
    transport = ScriptedTransport(echo.port, clock)
    transport.fail_always = TransientError("bastion unreachable")
    settings = TunnelSettings(backoff_initial=0.5, backoff_max=4, health_interval=60, keepalive_interval=60)
    t = Tunnel("orders", 0, "db", 3306, transport, settings, clock=clock, rnd=lambda: 0.5,
               probe=lambda *a: ProbeResult(True))
    try:
        t.start()
        delays = []
        for n in range(1, 7):
            eventually(lambda: len(transport.attempts) == n and t.state == S.BACKOFF, what=f"attempt {n}")
            st = t.status()
            delays.append(round(st.next_retry_at - transport.attempts[-1], 6))
            clock.wait_for_waiters(1)
            clock.advance(delays[-1] - 0.01)
            time.sleep(0.02)
            assert len(transport.attempts) == n          # not before its time
            clock.advance(0.01)
        assert delays == [0.5, 1, 2, 4, 4, 4]
        transport.fail_always = None
        eventually(lambda: t.state == S.UP, what="up")
        first_up = len(transport.attempts)
        # proven by the probe, then lost: the first retry is immediate (no clock advance needed)
        transport.fail_always = TransientError("bastion restarting")
        transport.die()
        eventually(lambda: len(transport.attempts) == first_up + 1 and t.state == S.BACKOFF, what="immediate retry")
        assert t.status().next_retry_at - transport.attempts[-1] == pytest.approx(0.5)
    finally:
        t.stop()


# ---- probe_mysql and packets ----------------------------------------------------------------

class OneShot(Transport):
    kind = "one-shot"

    def __init__(self, reply: bytes):
        self.reply = reply

    def connect(self):
        pass

    def open_channel(self, host, port, timeout):
        a, b = socket.socketpair()
        b.sendall(self.reply)
        b.close()
        return a

    def is_alive(self):
        return True

    def close(self):
        pass


def test_probe_reads_a_greeting():
    result = probe_mysql(OneShot(mysql_greeting(b"8.0.28-aurora")), "db", 3306, 2)
    assert result.ok and result.detail == "8.0.28-aurora"


def test_probe_reads_a_refusal():
    result = probe_mysql(OneShot(mysql_error(1040, "Too many connections")), "db", 3306, 2)
    assert not result.ok and result.code == 1040 and result.detail == "Too many connections"


@pytest.mark.parametrize("reply", [b"", b"\x05\x00\x00\x00HTTP/", b"SSH-2.0-OpenSSH_9.2\r\n"])
def test_probe_rejects_silence_and_other_protocols(reply):
    with pytest.raises(TransientError):
        probe_mysql(OneShot(reply), "db", 3306, 2)


def test_error_packet_is_well_formed():
    packet = mysql_error_packet("tunnel is in backoff")
    assert int.from_bytes(packet[:3], "little") == len(packet) - 4
    assert packet[3] == 0, "an ERR sent instead of the greeting has sequence id 0"
    assert packet[4] == 0xFF and packet[5:7] == (1105).to_bytes(2, "little")
    assert packet.endswith(b"#HY000tunnel is in backoff")


@pytest.mark.parametrize("code", [2003, 2013, 0, 999])
def test_error_packet_refuses_client_range_codes(code):
    with pytest.raises(ValueError):
        mysql_error_packet("x", code=code)


def test_pymysql_shows_the_refusal_text():
    pymysql = pytest.importorskip("pymysql")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    port = server.getsockname()[1]

    def answer():
        conn, _ = server.accept()
        conn.sendall(mysql_error_packet("dbtunneld: tunnel 'orders' is backoff: bastion unreachable"))
        conn.close()

    threading.Thread(target=answer, daemon=True).start()
    try:
        with pytest.raises(pymysql.err.OperationalError) as info:
            pymysql.connect(host="127.0.0.1", port=port, user="x", password="y", connect_timeout=5)
        assert info.value.args[0] == 1105 and "bastion unreachable" in str(info.value)
    finally:
        server.close()


def test_stop_during_a_hanging_connect_then_start_again(make):
    """A keeper stuck in connect when the user disconnects and reconnects: its late result is
    dropped, and the new run connects on its own."""
    t, transport = make()
    transport.gate.clear()
    t.start()
    eventually(lambda: len(transport.attempts) == 1, what="first connect hanging")
    t.stop(timeout=0.1)
    t.start()
    transport.gate.set()
    eventually(lambda: t.state == S.UP and transport.alive, what="up in the new run")
    connect_and_greet(t.local_port).close()
    assert t.state == S.UP


class AffinityRecordingTransport(ScriptedTransport):
    """Notes the CPUs each thread that connects or opens a channel may run on."""

    pin_data_path = True

    def __init__(self, server_port: int) -> None:
        super().__init__(server_port)
        self.seen: list[frozenset[int]] = []

    def connect(self) -> None:
        self.seen.append(frozenset(os.sched_getaffinity(0)))
        super().connect()

    def open_channel(self, host, port, timeout):
        self.seen.append(frozenset(os.sched_getaffinity(0)))
        return super().open_channel(host, port, timeout)


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
                    reason="needs thread affinity and two CPUs")
def test_a_tunnels_threads_share_one_cpu_and_tunnels_take_turns(make, echo):
    runs = []
    for _ in range(2):
        transport = AffinityRecordingTransport(echo.port)
        t, _ = make(transport=transport)
        t.start()
        eventually(lambda: t.state == S.UP, what="up")
        connect_and_greet(t.local_port).close()       # a connection thread opens a channel
        eventually(lambda: len(transport.seen) >= 2, what="a channel opened")
        runs.append(set(transport.seen))
    assert all(len(seen) == 1 and len(next(iter(seen))) == 1 for seen in runs), runs
    assert runs[0] != runs[1], "two tunnels on the same CPU"


def test_only_plain_ssh_pins_its_data_path(make, echo):
    from dbtunneld.adapters.transport import SshTransport, SsmPortForwardTransport, SsmSshTransport

    assert SshTransport.pin_data_path
    assert not SsmSshTransport.pin_data_path and not SsmPortForwardTransport.pin_data_path
    t, _ = make(transport=ScriptedTransport(echo.port))
    assert t._cpu is None


def test_threads_are_not_pinned_when_turned_off(monkeypatch):
    monkeypatch.setenv("DBTUNNELD_PIN_THREADS", "0")
    assert data_path_cpu() is None


def test_open_connections_hold_no_threads(make):
    """Forty open, flowing connections cost no thread each: one forwarding loop moves them all."""
    t, _ = make()
    t.start()
    eventually(lambda: t.state == S.UP, what="up")
    connect_and_greet(t.local_port).close()             # the loop and an opener thread exist now
    eventually(lambda: t.status().connections_open == 0, what="first connection closed")
    baseline = tunnel_threads()
    socks = [connect_and_greet(t.local_port) for _ in range(40)]
    try:
        for i, sock in enumerate(socks):
            sock.sendall(b"%d" % i)
        assert [recv_exact(s, len(b"%d" % i)) for i, s in enumerate(socks)] == [b"%d" % i for i in range(40)]
        assert t.status().connections_open == 40
        assert tunnel_threads() <= baseline, threading.enumerate()
    finally:
        for sock in socks:
            sock.close()
    eventually(lambda: t.status().connections_open == 0, what="all closed")


def tunnel_threads() -> int:
    return sum(th.name.startswith("tunnel-orders") for th in threading.enumerate())


def test_tunnels_on_a_shared_scheduler_keep_only_their_forwarding_thread(echo):
    """The supervisor's API: Tunnel(..., scheduler=, engine=) steps on the shared schedule; a
    tunnel then owns one thread (its forwarding loop): no keeper, acceptor, watcher or opener."""
    from dbtunneld.core.timing import SYSTEM_CLOCK
    from dbtunneld.engine.engine_loop import EngineLoop
    from dbtunneld.engine.scheduler import Scheduler

    with pytest.raises(ValueError, match="scheduler= and engine="):
        Tunnel("x", 0, "db", 3306, ScriptedTransport(echo.port), FAST, scheduler=Scheduler(SYSTEM_CLOCK))
    with EngineLoop(name="shared-engine") as engine:
        sched = Scheduler(SYSTEM_CLOCK)
        driver = engine.submit(sched.drive(engine))
        tunnels = [Tunnel(f"shared{i}", 0, "db", 3306, ScriptedTransport(echo.port), FAST,
                          scheduler=sched, engine=engine) for i in range(3)]
        try:
            for t in tunnels:
                t.start()
            eventually(lambda: all(t.state == S.UP for t in tunnels), what="all up")
            socks = [connect_and_greet(t.local_port) for t in tunnels]
            assert set(sched.units()) == set(tunnels)
            own = sorted(th.name for th in threading.enumerate() if th.name.startswith("tunnel-shared"))
            assert own == [f"tunnel-shared{i}-forward" for i in range(3)], own
            tunnels[0].reconnect()
            eventually(lambda: tunnels[0].status().reconnects == 1 and tunnels[0].state == S.UP, what="rebuilt")
            for s in socks:
                s.close()
        finally:
            for t in tunnels:
                t.stop()
        assert sched.units() == []
        driver.cancel()


class QueuedOpensTransport(ScriptedTransport):
    """Channel opens answered only after ``open_delay`` seconds while the upstream lives: a busy
    single-stream link (ssm-ssh through the SSM agent, whose outgoing buffer holds ~10 MB) has
    the open confirmation queued behind the download bytes already in flight
    (amazon-ssm-agent ``agent/session/datachannel/datachannel.go`` ``SendStreamDataMessage`` puts
    each message at the end of ``OutgoingMessageBuffer``; no message overtakes another). An open
    given up (``timeout``) before then fails like paramiko's ``open_channel`` (an exception after
    ``timeout``). Opens made while ``slow`` is False answer at once (the tunnel's own probe at
    start)."""

    def __init__(self, server_port: int, open_delay: float) -> None:
        super().__init__(server_port)
        self.open_delay = open_delay
        self.slow = False
        self.given_up: list[float] = []        # the timeouts of opens given up

    def open_channel(self, host, port, timeout):
        if self.slow:
            if timeout < self.open_delay:
                time.sleep(timeout)
                self.given_up.append(timeout)
                raise TransientError("scripted: timed out opening a channel")
            time.sleep(self.open_delay)
        return super().open_channel(host, port, timeout)


def queued_opens_tunnel(make, echo, open_delay: float, connect_wait: float):
    """An up tunnel over a ``QueuedOpensTransport`` (health_timeout 1 s)."""
    transport = QueuedOpensTransport(echo.port, open_delay=open_delay)
    t, _ = make(settings=TunnelSettings(connect_wait=connect_wait, health_interval=60, health_timeout=1,
                                        keepalive_interval=60, backoff_initial=0.2, backoff_max=1),
                transport=transport)
    t.start()
    eventually(lambda: t.state == S.UP)
    return t, transport


def test_a_busy_link_s_slow_channel_open_is_waited_for_not_refused(make, echo):
    """A client arriving while a download fills a single-stream link gets its channel once the
    confirmation comes through (within connect_wait), instead of giving the open up after
    health_timeout and retrying behind ever more bytes until connect_wait refuses it; the busy
    upstream stays (bytes flow: not dead), and the check still starts after health_timeout."""
    t, transport = queued_opens_tunnel(make, echo, open_delay=2.5, connect_wait=8)
    busy = connect_and_greet(t.local_port)
    stop = threading.Event()

    def download() -> None:                  # bytes keep arriving on the upstream
        while not stop.is_set():
            busy.sendall(b"d" * 65536)
            recv_exact(busy, 65536)

    flow = threading.Thread(target=download, daemon=True)
    flow.start()
    transport.slow = True
    try:
        started = time.monotonic()
        late = connect_and_greet(t.local_port, timeout=12)
        waited = time.monotonic() - started
        late.sendall(b"ping")
        assert recv_exact(late, 4) == b"ping"
        late.close()
    finally:
        stop.set()
        flow.join(10)
        busy.close()
    assert waited < 6.0, f"waited {waited:.1f} s for a channel that came after 2.5 s"
    # the check's probe (health_timeout) gave its open up: the check ran; no client's open was given up
    assert transport.given_up and all(timeout <= 1.0 for timeout in transport.given_up), transport.given_up
    assert t.status().reconnects == 0 and t.state == S.UP


def test_an_open_unanswered_for_all_of_connect_wait_is_refused_with_what_happened(make, echo):
    """The upstream stays up (bytes flow) but the channel never opens in time: the client's
    refusal names the destination, connect_wait and the error, not "tunnel is up"."""
    t, transport = queued_opens_tunnel(make, echo, open_delay=30, connect_wait=2)
    transport.slow = True
    sock = socket.create_connection(("127.0.0.1", t.local_port), timeout=15)
    header = recv_exact(sock, 4)
    payload = recv_exact(sock, int.from_bytes(header[:3], "little"))
    sock.close()
    assert payload[:1] == b"\xff"
    text = payload[9:].decode()
    assert "no connection to db.internal:3306 through tunnel 'orders' within connect_wait (2 s)" in text, text
    assert "timed out opening a channel" in text, text
