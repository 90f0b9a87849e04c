"""COM_CHANGE_USER through the local login, on the real stack (sandbox MariaDB, real leases).

PyMySQL has no ``change_user`` and the ``mariadb`` CLI offers none (``\\u`` is USE, ``\\r``
reconnects), so the command is built here from the protocol page with PyMySQL's own scramble
helpers and sent on a PyMySQL connection; PyMySQL's reader checks every answer's sequence id.
"""

from __future__ import annotations

import struct

import pytest

from dbtunneld.adapters import mysqlwire as w
from test_local_login_stack import LOCAL_PASSWORD, LOCAL_USER, connect, current_user, leases, local_tunnel  # noqa: F401
from test_tunnel_stack import TRANSPORTS, env, tunnels  # noqa: F401 (fixtures)

pymysql = pytest.importorskip("pymysql")
from pymysql import _auth  # noqa: E402  (the client's scrambles, not ours)


def change_user(conn, user: str, password: str, plugin: str, database: str = "") -> None:
    """Send COM_CHANGE_USER on ``conn`` and read its answers to the OK (raises on ERR)."""
    scramble = _auth.scramble_native_password if plugin == w.NATIVE else _auth.scramble_caching_sha2
    auth = scramble(password.encode(), conn.salt)
    args = (user.encode() + b"\0" + bytes([len(auth)]) + auth + database.encode() + b"\0"
            + struct.pack("<H", 45) + plugin.encode() + b"\0")
    conn._execute_command(w.COM_CHANGE_USER, args)
    while True:
        packet = conn._read_packet()           # raises for ERR; checks the sequence id
        data = packet.get_all_data()
        if data[:1] == b"\x00":
            return
        assert data == bytes([1, w.FAST_AUTH_OK]) and plugin == w.CACHING_SHA2, data


@pytest.mark.parametrize("kind", TRANSPORTS)
@pytest.mark.parametrize("plugin", [w.NATIVE, w.CACHING_SHA2])
def test_change_user_logs_in_again_as_the_current_lease(env, tunnels, leases, kind, plugin):  # noqa: F811
    t, _ = local_tunnel(env, tunnels, leases, kind, plugin)
    orders = env.stack.clusters["orders"]
    conn = connect(t.local_port)
    first = leases.current
    assert current_user(conn) == first.username
    second = leases.rotate()
    change_user(conn, LOCAL_USER, LOCAL_PASSWORD, plugin, orders.database)
    with conn.cursor() as cur:
        cur.execute("SELECT CURRENT_USER(), DATABASE()")
        user, database = cur.fetchone()
        assert (user.split("@")[0], database) == (second.username, orders.database) != (first.username, database)
        cur.execute(f"SELECT COUNT(*) FROM `{orders.table}`")
        assert cur.fetchone()[0] > 0
    change_user(conn, LOCAL_USER, LOCAL_PASSWORD, plugin)   # a second time on the same connection
    assert current_user(conn) == second.username
    conn.close()


def test_change_user_with_a_wrong_password_is_1045_and_the_session_stays(env, tunnels, leases):  # noqa: F811
    t, login = local_tunnel(env, tunnels, leases, "ssh")
    conn = connect(t.local_port)
    before = current_user(conn)
    with pytest.raises(pymysql.err.OperationalError) as refused:
        change_user(conn, LOCAL_USER, "not-the-password", w.NATIVE)
    assert refused.value.args[0] == w.ER_ACCESS_DENIED
    assert current_user(conn) == before              # still logged in as it was, sequence ids in step
    login.limiter.succeeded()
    conn.close()


def test_big_queries_around_a_change_user_pass_untouched(env, tunnels, leases):  # noqa: F811
    """Packets whose payloads hold 0x11 bytes and headers split over reads are not commands."""
    t, _ = local_tunnel(env, tunnels, leases, "ssh")
    conn = connect(t.local_port)
    blob = "\x11" * 70000
    with conn.cursor() as cur:
        cur.execute("SELECT LENGTH(%s)", (blob,))
        assert cur.fetchone()[0] == 70000
    change_user(conn, LOCAL_USER, LOCAL_PASSWORD, w.NATIVE)
    with conn.cursor() as cur:
        cur.execute("SELECT LENGTH(%s)", (blob,))
        assert cur.fetchone()[0] == 70000
    conn.close()


def test_change_user_upstream_on_caching_sha2_fast_path(env, tunnels, leases):  # noqa: F811
    """The sandbox's MariaDB has no caching_sha2_password: the upstream of the outer tunnel is a
    second local login that offers it (and checks the outer's COM_CHANGE_USER independently)."""
    from dbtunneld.core.model import DbCredentials
    from dbtunneld.engine.local_login import LocalLogin
    import time

    inner, _ = local_tunnel(env, tunnels, leases, "ssh", w.CACHING_SHA2)
    as_lease = DbCredentials(LOCAL_USER, LOCAL_PASSWORD, "lease/local", time.time() + 600)
    outer_login = LocalLogin("outer", "outer-user", lambda: "outer-pw", lambda: as_lease)
    outer = tunnels(env.transport("ssm-port-forward", "127.0.0.1", inner.local_port), ("127.0.0.1", inner.local_port),
                    before_relay=outer_login)
    conn = connect(outer.local_port, "outer-pw", "outer-user")
    first = current_user(conn)
    second = leases.rotate()
    change_user(conn, "outer-user", "outer-pw", w.NATIVE)
    assert current_user(conn) == second.username != first
    conn.close()

