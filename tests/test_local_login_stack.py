"""The local login on the real stack: a Tunnel with ``LocalLogin`` in front of the sandbox's MariaDB,
through every transport (ssh, ssm-ssh, ssm-port-forward via the SSM stand-in).

Leased users are real (``database/creds`` from OpenBao through dbtunneld's Vault client). Clients
are PyMySQL and the real ``mariadb`` CLI, with both auth plugins on the client side. A rotation
swaps the leased user: the same local pair logs in again (as the new user) and a session opened
before keeps working. Wrong passwords are refused with 1045 and lock the port with backoff.
"""

from __future__ import annotations

import subprocess
import time

import pytest

from dbtunneld.adapters import mysqlwire as w
from dbtunneld.core.model import DbCredentials
from dbtunneld.engine.local_login import FREE_WRONG, LocalLogin
from dbtunneld.sandbox.cli import lease_users
from test_tunnel_stack import TRANSPORTS, env, eventually, tunnels  # noqa: F401 (fixtures)

pymysql = pytest.importorskip("pymysql")

LOCAL_USER = "orders"
LOCAL_PASSWORD = "local-Pa55-word"


class Leases:
    """The cluster's "current lease", as the engine would hand it out; ``rotate`` mints a new one."""

    def __init__(self, stack) -> None:
        self.stack = stack
        self.current: DbCredentials | None = None
        self.rotate()

    def rotate(self) -> DbCredentials:
        u = lease_users(self.stack)["orders"]
        self.current = DbCredentials(u["username"], u["password"], u["lease_id"], time.time() + u["ttl"])
        return self.current


@pytest.fixture(scope="module")
def leases(env):  # noqa: F811
    return Leases(env.stack)


def local_tunnel(env, tunnels, leases, kind: str, plugin: str = "", password: str = LOCAL_PASSWORD):  # noqa: F811
    orders = env.stack.clusters["orders"]
    login = LocalLogin("orders", LOCAL_USER, lambda: password, lambda: leases.current, greeting_plugin=plugin)
    t = tunnels(env.transport(kind, "127.0.0.1", orders.port), ("127.0.0.1", orders.port), before_relay=login)
    return t, login


def connect(port: int, password: str = LOCAL_PASSWORD, user: str = LOCAL_USER, **kw):
    return pymysql.connect(host="127.0.0.1", port=port, user=user, password=password, connect_timeout=30,
                           read_timeout=30, **kw)


def current_user(conn) -> str:
    with conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER(), DATABASE()")
        user, _db = cur.fetchone()
    return user.split("@")[0]


def mariadb_cli(port: int, tmp_path, sql: str, password: str = LOCAL_PASSWORD, *extra: str) -> subprocess.CompletedProcess:
    """The real mariadb CLI; the password in a 0600 option file (never in its arguments)."""
    opts = tmp_path / "client.cnf"
    opts.write_text(f"[client]\npassword={password}\n")
    opts.chmod(0o600)
    argv = ["mariadb", f"--defaults-extra-file={opts}", "-h", "127.0.0.1", "-P", str(port), "-u", LOCAL_USER,
            "--batch", "--skip-column-names", "--connect-timeout=30", *extra, "-e", sql]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("plugin", [w.NATIVE, w.CACHING_SHA2])
def test_local_pair_survives_a_rotation(env, tunnels, leases, kind, plugin, tmp_path):  # noqa: F811
    t, _ = local_tunnel(env, tunnels, leases, kind, plugin)
    first = leases.current
    old = connect(t.local_port, database=env.stack.clusters["orders"].database)
    assert current_user(old) == first.username
    cli = mariadb_cli(t.local_port, tmp_path, "SELECT CURRENT_USER()")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip().startswith(first.username + "@")

    second = leases.rotate()                        # what `dbtunneld renew --rotate` does to the engine
    again = connect(t.local_port)
    assert current_user(again) == second.username != first.username
    cli = mariadb_cli(t.local_port, tmp_path, "SELECT CURRENT_USER()", LOCAL_PASSWORD,
                      f"--default-auth={plugin}")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip().startswith(second.username + "@")
    assert current_user(old) == first.username      # the old session keeps its lease's user
    old.close()
    again.close()


@pytest.mark.parametrize("client_plugin", ["client_ed25519", "sha256_password"])
def test_a_client_on_another_plugin_is_switched_to_ours(env, tunnels, leases, client_plugin, tmp_path):  # noqa: F811
    t, _ = local_tunnel(env, tunnels, leases, "ssh", w.CACHING_SHA2)
    cli = mariadb_cli(t.local_port, tmp_path, "SELECT CURRENT_USER()", LOCAL_PASSWORD, f"--default-auth={client_plugin}")
    assert cli.returncode == 0, cli.stderr
    assert cli.stdout.strip().startswith(leases.current.username + "@")


def test_database_and_charset_reach_the_server(env, tunnels, leases):  # noqa: F811
    t, _ = local_tunnel(env, tunnels, leases, "ssh")
    orders = env.stack.clusters["orders"]
    conn = connect(t.local_port, database=orders.database, charset="latin1", program_name="local-login-test")
    with conn.cursor() as cur:
        cur.execute("SELECT DATABASE(), @@character_set_client")
        assert cur.fetchone() == (orders.database, "latin1")
        cur.execute(f"SELECT COUNT(*) FROM `{orders.table}`")
        assert cur.fetchone()[0] > 0
    conn.close()


def test_wrong_password_is_refused_logged_and_rate_limited(env, tunnels, leases, caplog, tmp_path):  # noqa: F811
    t, login = local_tunnel(env, tunnels, leases, "ssh")
    for attempt in range(FREE_WRONG):
        with pytest.raises(pymysql.err.OperationalError) as err:
            connect(t.local_port, password=f"wrong-{attempt}")
        assert err.value.args[0] == w.ER_ACCESS_DENIED
    with pytest.raises(pymysql.err.OperationalError) as err:
        connect(t.local_port)                        # locked now: even the right password waits
    assert err.value.args[0] == w.ER_ACCESS_DENIED and "too many wrong passwords" in err.value.args[1]
    cli = mariadb_cli(t.local_port, tmp_path, "SELECT 1", "wrong-again")
    assert cli.returncode != 0 and "ERROR 1045" in cli.stderr
    eventually(lambda: login.limiter.locked_for() == 0, timeout=5, what="the lock to end")
    conn = connect(t.local_port)                     # the lock is over: the right password works
    assert current_user(conn) == leases.current.username
    conn.close()
    with pytest.raises(pymysql.err.OperationalError):
        connect(t.local_port, user="someone-else")  # the right password for another user name
    logged = caplog.text
    assert "wrong local user or password" in logged
    assert LOCAL_PASSWORD not in logged and "wrong-0" not in logged and leases.current.password not in logged


def test_upstream_refusal_is_a_readable_server_error(env, tunnels, leases):  # noqa: F811
    orders = env.stack.clusters["orders"]
    bad = DbCredentials("v-nobody", "not-the-password", "lease/x", time.time() + 60)
    login = LocalLogin("orders", LOCAL_USER, lambda: LOCAL_PASSWORD, lambda: bad)
    t = tunnels(env.transport("ssh", "127.0.0.1", orders.port), ("127.0.0.1", orders.port), before_relay=login)
    with pytest.raises(pymysql.err.OperationalError) as err:
        connect(t.local_port)
    assert err.value.args[0] == w.ER_UNKNOWN
    assert "refused the leased user v-nobody" in err.value.args[1] and "1045" in err.value.args[1]
    assert "not-the-password" not in err.value.args[1]


def test_no_lease_yet_is_a_readable_server_error(env, tunnels):  # noqa: F811
    orders = env.stack.clusters["orders"]
    login = LocalLogin("orders", LOCAL_USER, lambda: LOCAL_PASSWORD, lambda: None)
    t = tunnels(env.transport("ssh", "127.0.0.1", orders.port), ("127.0.0.1", orders.port), before_relay=login)
    with pytest.raises(pymysql.err.OperationalError) as err:
        connect(t.local_port)
    assert err.value.args[0] == w.ER_UNKNOWN and "no database user yet" in err.value.args[1]


@pytest.mark.parametrize("plugin", [w.NATIVE, w.CACHING_SHA2])
def test_tls_clients_log_in_over_a_verified_local_certificate(env, tunnels, leases, plugin, tmp_path):  # noqa: F811
    import ssl

    from dbtunneld.adapters.local_tls import CERT_NAME, KEY_NAME, server_context
    orders = env.stack.clusters["orders"]
    login = LocalLogin("orders", LOCAL_USER, lambda: LOCAL_PASSWORD, lambda: leases.current,
                       greeting_plugin=plugin, tls=server_context(tmp_path))
    assert (tmp_path / KEY_NAME).stat().st_mode & 0o777 == 0o600
    assert (tmp_path / CERT_NAME).stat().st_mode & 0o777 == 0o600
    t = tunnels(env.transport("ssh", "127.0.0.1", orders.port), ("127.0.0.1", orders.port), before_relay=login)
    cert = str(tmp_path / CERT_NAME)
    conn = connect(t.local_port, ssl={"ca": cert}, database=orders.database)   # verifies name and chain
    assert isinstance(conn._sock, ssl.SSLSocket)
    with conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*) FROM `{orders.table}`")
        assert cur.fetchone()[0] > 0
        cur.execute("SELECT REPEAT('x', 3000000)")                     # a few MB through the bridge
        assert len(cur.fetchone()[0]) == 3000000
    assert current_user(conn) == leases.current.username
    conn.close()
    cli = mariadb_cli(t.local_port, tmp_path, "status", LOCAL_PASSWORD, "--ssl", f"--ssl-ca={cert}",
                      "--ssl-verify-server-cert", f"--default-auth={plugin}")
    assert cli.returncode == 0, cli.stderr
    assert "Cipher in use" in cli.stdout
    with pytest.raises(pymysql.err.OperationalError) as err:          # a wrong password over TLS too
        connect(t.local_port, password="wrong", ssl={"ca": cert})
    assert err.value.args[0] == w.ER_ACCESS_DENIED


def test_without_local_tls_a_client_that_requires_ssl_is_told_why(env, tunnels, leases, tmp_path):  # noqa: F811
    t, _ = local_tunnel(env, tunnels, leases, "ssh")
    cli = mariadb_cli(t.local_port, tmp_path, "SELECT 1", LOCAL_PASSWORD, "--ssl", "--ssl-verify-server-cert")
    assert cli.returncode != 0 and "SSL" in cli.stderr


def test_thirty_concurrent_logins_each_as_the_lease(env, tunnels, leases):  # noqa: F811
    import threading
    t, _ = local_tunnel(env, tunnels, leases, "ssh")
    results: list = [None] * 30

    def one(i):
        try:
            conn = connect(t.local_port)
            results[i] = current_user(conn)
            conn.close()
        except Exception as exc:   # recorded, asserted below
            results[i] = repr(exc)
    threads = [threading.Thread(target=one, args=(i,)) for i in range(30)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert results == [leases.current.username] * 30


def test_upstream_caching_sha2_fast_path_against_a_second_local_login(env, tunnels, leases):  # noqa: F811
    """The sandbox's MariaDB has no caching_sha2_password, so the upstream side of that plugin logs
    in to another LocalLogin that offers it (and verifies the scramble independently of ours)."""
    import socket
    import threading

    inner, _ = local_tunnel(env, tunnels, leases, "ssh", w.CACHING_SHA2)
    as_lease = DbCredentials(LOCAL_USER, LOCAL_PASSWORD, "lease/local", time.time() + 600)
    outer = LocalLogin("outer", "outer-user", lambda: "outer-pw", lambda: as_lease)
    client_end, proxy_end = socket.socketpair()
    upstream = socket.create_connection(("127.0.0.1", inner.local_port), timeout=30)
    relayed: list = []

    def proxy():
        handoff = outer(proxy_end, upstream)
        relayed.append(handoff)
        if handoff is None:
            return
        relay = handoff.client
        for src, dst in ((relay, upstream), (upstream, relay)):
            threading.Thread(target=copy, args=(src, dst), daemon=True).start()

    def copy(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:              # closed at the end of the test
            pass
    threading.Thread(target=proxy, daemon=True).start()
    conn = pymysql.connections.Connection(user="outer-user", password="outer-pw", defer_connect=True,
                                          connect_timeout=30, read_timeout=30)
    conn.connect(client_end)
    try:
        assert current_user(conn) == leases.current.username
    finally:
        conn.close()
        upstream.close()
    assert relayed and relayed[0].client is proxy_end
