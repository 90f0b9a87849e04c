"""Tunnels on real servers: OpenSSH sshd as the bastion, MariaDB behind it, a byte-exact echo
server, and (with the sandbox stack) the SSM stand-in. Faults: the bastion killed and restarted
while a watcher keeps connecting, frozen with SIGSTOP, a changed host key, a busy port."""

from __future__ import annotations

import hashlib
import random
import socket
import threading
import time

import pytest

from dbtunneld import ssh
from dbtunneld.config import TunnelSettings
from dbtunneld.model import TunnelState
from dbtunneld.ports import bind_listener
from dbtunneld.transport import SshTransport
from dbtunneld.tunnel import Tunnel
from tunnel_servers import GreetingEchoServer, MariaDB, Sshd, keygen

pymysql = pytest.importorskip("pymysql")
S = TunnelState
SETTINGS = TunnelSettings(connect_wait=20, health_interval=30, health_timeout=2, keepalive_interval=2,
                          backoff_initial=0.2, backoff_max=2)
MB = 1 << 20


def eventually(predicate, timeout: float = 20.0, what: str = "condition"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


# ---- servers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mariadb(tmp_path_factory):
    db = MariaDB(tmp_path_factory.mktemp("mariadb")).start()
    db.sql("CREATE TABLE appdb.t (id INT PRIMARY KEY, v VARCHAR(20)); INSERT INTO appdb.t VALUES (1, 'hello');")
    yield db
    db.stop()


@pytest.fixture(scope="module")
def echo():
    server = GreetingEchoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory, mariadb, echo):
    server = Sshd(tmp_path_factory.mktemp("bastion"), permit_open=[mariadb.port, echo.port]).start()
    yield server
    server.stop()


@pytest.fixture
def bastion(sshd):
    """The module's bastion, guaranteed running (and not frozen) for each test."""
    if sshd.proc is None or sshd.proc.poll() is not None:
        sshd.start()
    sshd.thaw()
    yield sshd
    sshd.thaw()
    if sshd.proc is None:
        sshd.start()


def ssh_transport(sshd: Sshd, host_key: str = "") -> SshTransport:
    def options_for(label):
        return ssh.SshOptions(user="root", host_label=label, key_file=str(sshd.client_key), use_agent=False,
                              host_key=host_key or sshd.host_key_line, timeout=5)
    return SshTransport("127.0.0.1", sshd.port, options_for)


@pytest.fixture
def tunnel_to():
    made = []

    def make(sshd: Sshd, port: int, settings: TunnelSettings = SETTINGS, host_key: str = "", local_port: int = 0):
        t = Tunnel(f"t{len(made)}", local_port, "127.0.0.1", port, ssh_transport(sshd, host_key), settings)
        made.append(t)
        t.start()
        return t

    yield make
    for t in made:
        t.stop()


def query(port: int, timeout: float = 25) -> str:
    conn = pymysql.connect(host="127.0.0.1", port=port, user="app", password="app-secret-pw", database="appdb",
                           connect_timeout=timeout, read_timeout=timeout)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT v FROM t WHERE id = 1")
            return cur.fetchone()[0]
    finally:
        conn.close()


# ---- byte-exact bulk ---------------------------------------------------------------------------

def skip_greeting(sock: socket.socket) -> None:
    header = recv_exact(sock, 4)
    recv_exact(sock, int.from_bytes(header[:3], "little"))


def recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), MB))
        if not chunk:
            raise EOFError(f"closed after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def echo_round_trip(port: int, total: int, seed: int) -> tuple[str, str]:
    """Send ``total`` pseudo-random bytes, read them back; the two SHA-256 digests."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    skip_greeting(sock)
    sent = hashlib.sha256()

    def send():
        rng = random.Random(seed)
        left = total
        while left:
            chunk = rng.randbytes(min(MB, left))
            sent.update(chunk)
            sock.sendall(chunk)
            left -= len(chunk)
        sock.shutdown(socket.SHUT_WR)

    sender = threading.Thread(target=send)
    sender.start()
    got, n = hashlib.sha256(), 0
    while chunk := sock.recv(MB):
        got.update(chunk)
        n += len(chunk)
    sender.join()
    sock.close()
    assert n == total
    return sent.hexdigest(), got.hexdigest()


def test_ssh_query_and_100mb_byte_exact(bastion, mariadb, echo, tunnel_to):
    db = tunnel_to(bastion, mariadb.port)
    bulk = tunnel_to(bastion, echo.port)
    assert query(db.local_port) == "hello"
    sent, got = echo_round_trip(bulk.local_port, 100 * MB, seed=5)
    assert sent == got
    assert db.status().state == S.UP and bulk.status().connections_total >= 1


def test_50_concurrent_connections_each_byte_exact(bastion, echo, tunnel_to):
    t = tunnel_to(bastion, echo.port)
    eventually(lambda: t.state == S.UP, what="up")
    results = [None] * 50

    def one(i):
        results[i] = echo_round_trip(t.local_port, 1 * MB + i, seed=i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(120)
    assert all(r is not None and r[0] == r[1] for r in results)
    assert t.status().connections_total >= 50


# ---- faults --------------------------------------------------------------------------------

class Watcher:
    """Connects to the port every 100 ms and records any refusal."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.attempts = 0
        self.refusals: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(0.1):
            self.attempts += 1
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=2).close()
            except OSError as exc:
                self.refusals.append(repr(exc))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)


@pytest.mark.fault
def test_bastion_killed_five_times_port_never_refuses(bastion, mariadb, tunnel_to):
    t = tunnel_to(bastion, mariadb.port)
    assert query(t.local_port) == "hello"
    recoveries = []
    with Watcher(t.local_port) as watcher:
        for _ in range(5):
            bastion.kill()
            eventually(lambda: t.state != S.UP, timeout=10, what="loss noticed")
            time.sleep(0.5)                       # the bastion stays away for a while
            bastion.start()
            started = time.monotonic()
            assert query(t.local_port) == "hello"  # no manual step: the client just waits
            recoveries.append(time.monotonic() - started)
    assert watcher.attempts > 20 and watcher.refusals == []
    assert t.status().reconnects >= 5
    print(f"recovery after restart (s): {[round(r, 2) for r in recoveries]}")


@pytest.mark.fault
def test_frozen_bastion_detected_and_recovered(bastion, mariadb, tunnel_to):
    t = tunnel_to(bastion, mariadb.port)
    assert query(t.local_port) == "hello"
    eventually(lambda: t.state == S.UP)
    bastion.freeze()
    frozen_at = time.monotonic()
    eventually(lambda: t.state != S.UP, timeout=15, what="a frozen bastion detected within 15 s")
    detected = time.monotonic() - frozen_at
    st = t.status()
    assert st.last_error and ("keepalive" in st.last_error or "greeting" in st.last_error)
    bastion.thaw()
    assert query(t.local_port) == "hello"
    assert t.state == S.UP
    print(f"frozen bastion detected after {detected:.1f} s")


def test_changed_host_key_is_refused(bastion, mariadb, tunnel_to, tmp_path):
    keygen(tmp_path / "impostor")
    pinned = " ".join((tmp_path / "impostor.pub").read_text().split()[:2])
    t = tunnel_to(bastion, mariadb.port, host_key=pinned)
    eventually(lambda: t.state == S.FAILED, what="failed")
    st = t.status()
    assert "does not match" in st.last_error and "bastion.host_key" in st.hint
    with pytest.raises(pymysql.err.OperationalError) as info:
        query(t.local_port, timeout=5)
    assert "does not match" in str(info.value)


def test_busy_port_reported_with_port_and_pid(bastion, mariadb, tunnel_to):
    holder = bind_listener(0)
    port = holder.getsockname()[1]
    try:
        t = tunnel_to(bastion, mariadb.port, local_port=port)
        st = t.status()
        assert st.state == S.FAILED and f"127.0.0.1:{port}" in st.last_error
        assert "pid" in st.last_error
    finally:
        holder.close()
