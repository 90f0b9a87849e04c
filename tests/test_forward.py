"""The forwarding loop (dbtunneld.adapters.forward) over real sockets and a real OpenSSH sshd."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from dbtunneld.adapters import forward, forward_upstream, paramiko_internals, ssh
from tunnel_servers import GreetingEchoServer, Sshd, mysql_greeting


def eventually(predicate, timeout: float = 10.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def read_exact(sock, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


@pytest.fixture
def loop():
    fw = forward.Forwarder("test-forward")
    fw.start()
    yield fw
    fw.close()


def linked(loop: forward.Forwarder, upstream_of, ended: list) -> socket.socket:
    """A client socket whose other end is forwarded to ``upstream_of()``'s upstream."""
    ours, client = socket.socketpair()
    loop.add(ours, upstream_of(), ended.append, "test")
    client.settimeout(30)
    return client


def socket_pair_upstream() -> tuple[forward_upstream.SocketUpstream, socket.socket]:
    near, far = socket.socketpair()
    far.settimeout(30)
    return forward_upstream.SocketUpstream(near), far


# ---- socket upstreams (the smux streams' shape) ---------------------------------------------

def test_bytes_and_half_closes_pass_both_ways(loop):
    ended: list = []
    up, far = socket_pair_upstream()
    client = linked(loop, lambda: up, ended)
    payload = os.urandom(3 << 20)
    threading.Thread(target=client.sendall, args=(payload,), daemon=True).start()
    assert read_exact(far, len(payload)) == payload
    client.shutdown(socket.SHUT_WR)
    assert far.recv(1) == b""                          # the client's EOF reached the upstream
    far.sendall(b"reply after EOF")                     # the other direction still flows
    assert read_exact(client, 15) == b"reply after EOF"
    far.shutdown(socket.SHUT_WR)
    assert client.recv(1) == b""
    eventually(lambda: len(ended) == 1, what="the link ended")


def test_a_stalled_upstream_holds_back_its_client_and_no_one_else(loop):
    """Upload back-pressure: while an upstream does not read, the loop stops reading its client
    (the client's sendall blocks) and keeps at most one read in hand; other links flow."""
    ended: list = []
    stuck_up, stuck_far = socket_pair_upstream()
    stuck_client = linked(loop, lambda: stuck_up, ended)
    payload = os.urandom(32 << 20)
    sent = threading.Event()
    threading.Thread(target=lambda: (stuck_client.sendall(payload), sent.set()), daemon=True).start()
    time.sleep(0.5)
    assert not sent.is_set(), "32 MiB vanished into an upstream that reads nothing"
    up, far = socket_pair_upstream()
    other = linked(loop, lambda: up, ended)
    other.sendall(b"ping")
    assert read_exact(far, 4) == b"ping"
    far.sendall(b"pong")
    assert read_exact(other, 4) == b"pong"
    assert read_exact(stuck_far, len(payload)) == payload   # in order, nothing lost
    assert sent.wait(10)


def test_a_client_that_does_not_read_holds_back_its_upstream_only(loop):
    """Download back-pressure: the loop stops reading an upstream whose client does not read."""
    ended: list = []
    up, far = socket_pair_upstream()
    client = linked(loop, lambda: up, ended)
    payload = os.urandom(32 << 20)
    sent = threading.Event()
    threading.Thread(target=lambda: (far.sendall(payload), sent.set()), daemon=True).start()
    time.sleep(0.5)
    assert not sent.is_set(), "32 MiB queued for a client that reads nothing"
    up2, far2 = socket_pair_upstream()
    other = linked(loop, lambda: up2, ended)
    far2.sendall(b"hello")
    assert read_exact(other, 5) == b"hello"
    assert read_exact(client, len(payload)) == payload
    assert sent.wait(10)


def test_abort_cuts_both_ends(loop):
    ended: list = []
    up, far = socket_pair_upstream()
    ours, client = socket.socketpair()
    client.settimeout(10)
    link = loop.add(ours, up, ended.append, "test")
    link.abort()
    eventually(lambda: ended == [link], what="ended")
    assert far.recv(1) == b""
    assert client.recv(1) == b""


def test_links_added_after_close_end_at_once():
    fw = forward.Forwarder("closed")
    fw.start()
    fw.close()
    ended: list = []
    up, far = socket_pair_upstream()
    ours, client = socket.socketpair()
    fw.add(ours, up, ended.append, "late")
    assert len(ended) == 1 and client.recv(1) == b""


# ---- SSH channels ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def echo():
    server = GreetingEchoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory, echo):
    server = Sshd(tmp_path_factory.mktemp("sshd"), permit_open=[echo.port]).start()
    yield server
    server.stop()


class CountingSocket:
    """The SSH socket, counting the write calls paramiko makes on it."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self.sends = 0

    def send(self, data) -> int:
        self.sends += 1
        return self._sock.send(data)

    def __getattr__(self, name):
        return getattr(self._sock, name)


@pytest.fixture
def conn(sshd):
    carrier = CountingSocket(ssh.tcp_connect("127.0.0.1", sshd.port))
    options = ssh.SshOptions(user="root", host_label=ssh.known_hosts_name("127.0.0.1", sshd.port),
                             key_file=str(sshd.client_key), use_agent=False, host_key=sshd.host_key_line,
                             timeout=5)
    c = ssh.connect(carrier, options)
    c.carrier = carrier
    yield c
    c.close()


def channel(conn, echo) -> forward_upstream.Upstream:
    return forward_upstream.upstream_for(conn.open_channel("127.0.0.1", echo.port, timeout=5))


def test_fifty_channels_at_once_each_byte_exact(loop, conn, echo):
    ended: list = []
    clients = [linked(loop, lambda: channel(conn, echo), ended) for _ in range(50)]
    payloads = [os.urandom(200_000 + i) for i in range(50)]
    for client, payload in zip(clients, payloads):
        threading.Thread(target=client.sendall, args=(payload,), daemon=True).start()
    greeting = mysql_greeting()
    for client, payload in zip(clients, payloads):
        assert read_exact(client, len(greeting) + len(payload)) == greeting + payload
        client.shutdown(socket.SHUT_WR)
        assert client.recv(1) == b""                    # the echo server's end came through
    eventually(lambda: len(ended) == 50, what="all links ended")


def test_a_slow_client_stops_its_channel_after_one_window_and_no_other(loop, conn, echo):
    """The window is acknowledged only for bytes the client took: a client that does not read
    holds at most one window (16 MiB) in dbtunneld, and other channels on the connection flow."""
    ended: list = []
    up = channel(conn, echo)
    slow = linked(loop, lambda: up, ended)
    payload = os.urandom(40 << 20)
    threading.Thread(target=slow.sendall, args=(payload,), daemon=True).start()
    time.sleep(1.5)
    assert up.queued() <= ssh.WINDOW_SIZE + ssh.MAX_PACKET
    other = linked(loop, lambda: channel(conn, echo), ended)
    greeting = mysql_greeting()
    other.sendall(b"ping")
    assert read_exact(other, len(greeting) + 4) == greeting + b"ping"
    assert read_exact(slow, len(greeting) + len(payload)) == greeting + payload


def test_one_turns_packets_leave_in_one_write(conn, echo):
    """Inside ``gather`` (a loop turn) the packets of several channels are written together;
    a packet another thread sends meanwhile first writes what was gathered (order is kept)."""
    chans = [conn.open_channel("127.0.0.1", echo.port, timeout=5) for _ in range(3)]
    greeting = mysql_greeting()
    for c in chans:
        assert read_exact(c, len(greeting)) == greeting
    before = conn.carrier.sends
    with paramiko_internals.gathering(conn._transport):
        for i, c in enumerate(chans):
            c.sendall(b"turn %d" % i)
        assert conn.carrier.sends == before
    assert conn.carrier.sends == before + 1
    with paramiko_internals.gathering(conn._transport):
        chans[0].sendall(b"first")
        pinged: list = []                               # the keepalive goes out from another thread
        pinger = threading.Thread(target=lambda: pinged.append(conn.ping(5)))
        pinger.start()
        pinger.join(10)
        assert pinged == [True]
        assert conn.carrier.sends == before + 3         # gathered bytes, then the keepalive
        chans[0].sendall(b"second")
    assert [read_exact(c, 6) for c in chans] == [b"turn 0", b"turn 1", b"turn 2"]
    assert read_exact(chans[0], 11) == b"firstsecond"


def test_a_gathering_inside_a_gathering_keeps_every_packet(conn, echo):
    """A link step run from inside a loop turn (a poke) gathers again on the same thread: the
    packets gathered so far must still leave, in order (dropping them broke the server's MAC
    check: "message authentication code incorrect", the connection reset)."""
    chans = [conn.open_channel("127.0.0.1", echo.port, timeout=5) for _ in range(2)]
    greeting = mysql_greeting()
    for c in chans:
        assert read_exact(c, len(greeting)) == greeting
    with paramiko_internals.gathering(conn._transport):
        chans[0].sendall(b"outer")
        with paramiko_internals.gathering(conn._transport):
            chans[1].sendall(b"inner")
        chans[0].sendall(b"after")
    chans[0].settimeout(10)
    chans[1].settimeout(10)
    assert read_exact(chans[0], 10) == b"outerafter"
    assert read_exact(chans[1], 5) == b"inner"
    assert conn.ping(5)
