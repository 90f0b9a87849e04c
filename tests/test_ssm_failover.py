"""Aurora failover on ssm-port-forward tunnels: the client follows the writer to its new instance.

The sandbox's two MariaDB servers play two Aurora instances at their own addresses,
127.0.0.2:P and 127.0.0.3:P (a TCP forwarder each, so both listen on the same port as instances
do). The SSM stand-in's resolver (``/_standin/dns``) answers the cluster endpoint name; its agent,
like the real one, resolves it once per session. A tunnel (the real ``Tunnel`` and
``SsmPortForwardTransport``) serves PyMySQL clients on a local port. Each test flips the DNS
answer mid-run and shows new connections reach the new writer: by the client's own DNS watch,
by a read-only answer (1290) from the old writer, and by the agent's ConnectToPortError when the
old instance is gone.
"""

from __future__ import annotations

import json
import socket
import threading
import time
import urllib.request

import boto3
import pymysql
import pytest

from dbtunneld.adapters.mysqlwire import mysql_error_packet
from dbtunneld.adapters.ssm.failover import ReadOnlyWatch, contains_read_only_error, is_writer_endpoint
from dbtunneld.adapters.transport import SsmPortForwardTransport
from dbtunneld.core.config import TunnelSettings
from dbtunneld.engine.tunnel import Tunnel
from dbtunneld.sandbox.ssm_testkit import StandInProcess

TARGET = "i-0123456789abcdef0"
ENDPOINT = "orders.cluster-cfailover0123.us-east-1.rds.amazonaws.com"
SETTINGS = TunnelSettings(connect_wait=20, health_interval=30, health_timeout=3, keepalive_interval=2,
                          backoff_initial=0.2, backoff_max=2)
APP_USER, APP_PASSWORD = "failover_app", "failover-app-pw-0123"


def test_read_only_errors_are_found_in_mysql_traffic_only():
    for code in (1290, 1836):
        packet = mysql_error_packet("The MariaDB server is running with the --read-only option", code=code, sequence=1)
        assert contains_read_only_error(b"\x05\x00\x00\x01abcde" + packet) == code
    assert contains_read_only_error(mysql_error_packet("Access denied", code=1045, sequence=1)) == 0
    assert contains_read_only_error(b"\xff\x0a\x05#HY000 in the middle of a row") == 0   # no packet header


def test_read_only_answer_split_across_reads_is_seen_once_and_passed_on():
    packet = b"\x07\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00" + mysql_error_packet("Running in read-only mode", code=1836, sequence=2)
    chunks = [packet[:14], packet[14:20], packet[20:], b""]

    class Stream:
        def recv(self, size):
            return chunks.pop(0)

    seen = []
    watched = ReadOnlyWatch(Stream(), seen.append)
    got = b"".join(iter(lambda: watched.recv(65536), b""))
    assert got == packet and seen == [1836]


def test_only_writer_endpoints_are_watched():
    assert is_writer_endpoint("orders.cluster-c0123.eu-west-1.rds.amazonaws.com")
    assert is_writer_endpoint("db.internal.example")
    assert not is_writer_endpoint("orders.cluster-ro-c0123.eu-west-1.rds.amazonaws.com")
    assert not is_writer_endpoint("reporting.cluster-custom-c0123.eu-west-1.rds.amazonaws.com")


class Instance:
    """An "Aurora instance": ``address:port`` forwarding to a MariaDB server; ``down()`` kills it."""

    def __init__(self, address: str, port: int, upstream: int) -> None:
        self.address, self.upstream = address, upstream
        self._listener = socket.create_server((address, port))
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.upstream), timeout=5)
            except OSError:
                client.close()
                continue
            with self._lock:
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._copy, args=(a, b), daemon=True).start()

    @staticmethod
    def _copy(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def down(self) -> None:
        self._listener.close()
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for s in sockets:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            s.close()


def _shared_port() -> int:
    for _ in range(50):
        with socket.socket() as probe:
            probe.bind(("127.0.0.2", 0))
            port = probe.getsockname()[1]
        try:
            socket.create_server(("127.0.0.3", port)).close()
            return port
        except OSError:
            continue
    raise RuntimeError("no port free on both 127.0.0.2 and 127.0.0.3")


@pytest.fixture
def cluster(stack, tmp_path):
    """(instances by address, the stand-in, each instance's real port) with an app user on both."""
    dbs = [stack.mariadb["orders"], stack.mariadb["billing"]]
    for db in dbs:
        db.query(f"CREATE DATABASE IF NOT EXISTS failover; CREATE TABLE IF NOT EXISTS failover.t (id INT AUTO_INCREMENT PRIMARY KEY, at DOUBLE);"
                 f"CREATE USER IF NOT EXISTS '{APP_USER}'@'%' IDENTIFIED BY '{APP_PASSWORD}';"
                 f"GRANT SELECT, INSERT ON failover.* TO '{APP_USER}'@'%';")
    port = _shared_port()
    instances = {"127.0.0.2": Instance("127.0.0.2", port, dbs[0].port), "127.0.0.3": Instance("127.0.0.3", port, dbs[1].port)}
    standin = StandInProcess("--target", f"{TARGET}=127.0.0.1:9", "--allow-remote", f"{ENDPOINT}:{port}", log_path=str(tmp_path / "standin.log"),
                             credentials={"AKIDFAILOVERTEST": "secret-failover-test"})
    standin.start()
    set_dns(standin, "127.0.0.2")
    try:
        yield instances, standin, port, {"127.0.0.2": dbs[0].port, "127.0.0.3": dbs[1].port}
    finally:
        standin.stop()
        for instance in instances.values():
            instance.down()
        for db in dbs:
            db.query("SET GLOBAL read_only = 0;")


def set_dns(standin: StandInProcess, address: str) -> None:
    standin.control("/_standin/dns", {"name": ENDPOINT, "addresses": [address]})


def standin_resolver(standin: StandInProcess):
    """The client's view of the same DNS (in AWS both ask Route 53)."""
    def resolve(host: str) -> frozenset:
        with urllib.request.urlopen(standin.url + "/_standin/dns", timeout=5) as resp:
            return frozenset(json.load(resp).get(host.lower(), []))
    return resolve


@pytest.fixture
def tunnel_for():
    made: list[Tunnel] = []

    def make(standin: StandInProcess, port: int, dns_interval: float | None) -> Tunnel:
        session = boto3.Session(aws_access_key_id="AKIDFAILOVERTEST", aws_secret_access_key="secret-failover-test", region_name="us-east-1")
        transport = SsmPortForwardTransport(lambda: session, lambda: TARGET, ENDPOINT, port, endpoint_url=standin.url,
                                            region="us-east-1", resolve=standin_resolver(standin), dns_interval=dns_interval)
        t = Tunnel(f"failover{len(made)}", 0, ENDPOINT, port, transport, SETTINGS)
        made.append(t)
        t.start()
        return t

    yield make
    for t in made:
        t.stop()


def server_port(local_port: int) -> int | None:
    """Which MariaDB answered a fresh connection (None: this attempt failed)."""
    try:
        conn = pymysql.connect(host="127.0.0.1", port=local_port, user=APP_USER, password=APP_PASSWORD, connect_timeout=10, read_timeout=10)
    except pymysql.MySQLError:
        return None
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT @@port")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def insert(local_port: int) -> int:
    """INSERT through a fresh connection; the server's port, or raises the server's error."""
    conn = pymysql.connect(host="127.0.0.1", port=local_port, user=APP_USER, password=APP_PASSWORD, connect_timeout=10, read_timeout=10, autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO failover.t (at) VALUES (%s)", (time.time(),))
            cur.execute("SELECT @@port")
            return int(cur.fetchone()[0])
    finally:
        conn.close()


def eventually(check, timeout: float):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    return check()


def test_dns_flip_moves_new_connections_to_the_new_writer(cluster, tunnel_for):
    instances, standin, port, real = cluster
    t = tunnel_for(standin, port, dns_interval=0.5)
    assert eventually(lambda: server_port(t.local_port), 20) == real["127.0.0.2"]
    set_dns(standin, "127.0.0.3")
    t0 = time.monotonic()
    assert eventually(lambda: server_port(t.local_port) == real["127.0.0.3"], 15)
    followed = time.monotonic() - t0
    assert followed < 10
    sessions = standin.sessions()
    assert len(sessions) >= 2 and sessions[0]["Status"] == "Terminated"


def test_read_only_answer_from_the_old_writer_rebuilds_the_session(cluster, tunnel_for, stack):
    instances, standin, port, real = cluster
    t = tunnel_for(standin, port, dns_interval=None)          # the client's DNS never shows the flip
    assert eventually(lambda: server_port(t.local_port), 20) == real["127.0.0.2"]
    stack.mariadb["orders"].query("SET GLOBAL read_only = 1;")  # failover: the old writer is a reader now
    set_dns(standin, "127.0.0.3")
    with pytest.raises(pymysql.MySQLError) as raised:
        insert(t.local_port)
    assert raised.value.args[0] == 1290
    assert eventually(lambda: _insert_port(t.local_port) == real["127.0.0.3"], 15)


def _insert_port(local_port: int) -> int | None:
    try:
        return insert(local_port)
    except pymysql.MySQLError:
        return None


def test_connect_to_port_error_rebuilds_the_session(cluster, tunnel_for):
    instances, standin, port, real = cluster
    t = tunnel_for(standin, port, dns_interval=None)
    assert eventually(lambda: server_port(t.local_port), 20) == real["127.0.0.2"]
    instances["127.0.0.2"].down()                              # the old writer is gone
    set_dns(standin, "127.0.0.3")
    assert eventually(lambda: server_port(t.local_port) == real["127.0.0.3"], 20)
