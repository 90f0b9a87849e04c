"""``upstream_tls``: the local login switches the channel to TLS when the server offers it.

A private stack whose MariaDB offers TLS (as Aurora does; the session stack's does not, so that
tests that read the relayed bytes see plaintext), reached through the tunnel over plain TCP
channels (``ScriptedTransport``); the "lease" is the MariaDB's admin account.
"""

from __future__ import annotations

import time

import pytest

from dbtunneld.adapters import mysqlwire as w
from dbtunneld.core.model import DbCredentials
from dbtunneld.engine.local_login import LocalLogin
from test_local_login_change_user import change_user
from test_local_login_stack import LOCAL_PASSWORD, LOCAL_USER, connect, current_user
from test_tunnel import ScriptedTransport
from test_tunnel_stack import tunnels  # noqa: F401 (fixture)

pymysql = pytest.importorskip("pymysql")


@pytest.fixture(scope="module")
def tls_db(tmp_path_factory):
    from dbtunneld.sandbox.stack import start_stack
    with start_stack(vault=False, aws=False, sso=False, ssh=False, ssm=False, clusters=("orders",),
                     mariadb_tls=True, base_dir=tmp_path_factory.mktemp("tls-stack")) as s:
        yield s.mariadb["orders"]


def tls_tunnel(tunnels, db, mode: str):  # noqa: F811
    lease = DbCredentials(db.admin_user, db.admin_password, "lease/admin", time.time() + 600)
    login = LocalLogin("orders", LOCAL_USER, lambda: LOCAL_PASSWORD, lambda: lease, upstream_tls=mode)
    return tunnels(ScriptedTransport(db.port), ("127.0.0.1", db.port), before_relay=login)


def ssl_cipher(conn) -> str:
    with conn.cursor() as cur:
        cur.execute("SHOW STATUS LIKE 'Ssl_cipher'")
        return cur.fetchone()[1]


@pytest.mark.parametrize("mode", ["required", "auto"])
def test_upstream_tls_encrypts_the_session_the_server_sees(tls_db, tunnels, mode):  # noqa: F811
    conn = connect(tls_tunnel(tunnels, tls_db, mode).local_port)
    assert current_user(conn) == tls_db.admin_user
    assert ssl_cipher(conn) != ""                    # the server's view of this proxied session
    blob = "y" * 300000
    with conn.cursor() as cur:                       # bulk both ways through the TLS bridge
        cur.execute("SELECT LENGTH(%s), REPEAT('z', 300000)", (blob,))
        n, back = cur.fetchone()
        assert (n, len(back)) == (300000, 300000)
    change_user(conn, LOCAL_USER, LOCAL_PASSWORD, w.NATIVE)
    assert ssl_cipher(conn) != ""
    conn.close()


def test_upstream_tls_off_keeps_the_session_plain(tls_db, tunnels):  # noqa: F811
    conn = connect(tls_tunnel(tunnels, tls_db, "off").local_port)
    assert ssl_cipher(conn) == ""
    conn.close()


def test_login_probe_works_against_a_server_that_offers_tls(tls_db):
    """PyMySQL 2.2 switches to TLS whenever offered; the probe's channel is not a socket."""
    from dbtunneld.engine.login_probe import probe_mysql_login

    transport = ScriptedTransport(tls_db.port)
    transport.connect()
    lease = DbCredentials(tls_db.admin_user, tls_db.admin_password, "lease/admin", time.time() + 600)
    result = probe_mysql_login(transport, "127.0.0.1", tls_db.port, 20, lease)
    assert result.ok
