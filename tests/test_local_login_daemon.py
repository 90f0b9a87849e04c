"""``login = "local"`` end to end: a real daemon on the sandbox stack (OpenBao leases, sshd, MariaDB).

The user copies the local pair once (`dbtunneld creds`); `dbtunneld renew --rotate` mints a new
leased user and the same pair logs in again (as the new user) with the real mariadb CLI; a
session opened before keeps working; `reset-password` changes the pair; `creds --field url`
never holds the password; sysbench runs through the proxy; `login = "lease"` still passes the
leased user through.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from dbtunneld.sandbox.daemonproc import DaemonOptions, DaemonUnderTest

pymysql = pytest.importorskip("pymysql")


def start_daemon(stack, login: str = "", transport: str = "ssh"):
    root = Path(tempfile.mkdtemp(prefix="dbt-local-", dir="/tmp"))
    d = DaemonUnderTest(stack, root, DaemonOptions(clusters=("orders",), transport=transport))
    if login:
        d.write_config(d.config.replace('name = "orders"', f'name = "orders"\nlogin = "{login}"', 1))
    return root, d


@pytest.fixture(params=["ssh", "ssm-ssh", "ssm-port-forward"])
def local_daemon(stack, request):
    root, d = start_daemon(stack, transport=request.param)
    with d:
        d.start()
        d.sign_in()
        d.cli("connect", "orders", "--wait", "60")
        yield d
    shutil.rmtree(root, ignore_errors=True)


def mariadb(port: int, user: str, password: str, sql: str, tmp: Path) -> subprocess.CompletedProcess:
    opts = tmp / "client.cnf"
    opts.write_text(f"[client]\npassword={password}\n")
    opts.chmod(0o600)
    return subprocess.run(["mariadb", f"--defaults-extra-file={opts}", "-h", "127.0.0.1", "-P", str(port),
                           "-u", user, "--batch", "--skip-column-names", "-e", sql],
                          capture_output=True, text=True, timeout=60)


def who(port: int, user: str, password: str, tmp: Path) -> str:
    out = mariadb(port, user, password, "SELECT CURRENT_USER()", tmp)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip().split("@")[0]


def test_saved_pair_keeps_working_across_rotation_and_reset(stack, local_daemon, tmp_path):
    d = local_daemon
    c = d.creds("orders")
    assert c["login"] == "local" and c["username"] == "orders" and c["expires_at"] is None
    lease_user, port, password = c["lease_user"], c["port"], c["password"]
    assert lease_user.startswith("v-") and password != ""
    assert who(port, "orders", password, tmp_path) == lease_user
    url = d.cli("creds", "orders", "--field", "url").stdout.strip()
    assert url.startswith("mysql://orders@127.0.0.1:") and password not in url
    shown = d.cli("creds", "orders").stdout
    assert password not in shown and "saved logins keep working" in shown

    old = pymysql.connect(host="127.0.0.1", port=port, user="orders", password=password, connect_timeout=30)
    d.cli("renew", "orders", "--rotate")
    rotated = d.wait_for(lambda st: _lease_user(d) != lease_user, 30, "a new leased user")
    assert rotated
    new_user = _lease_user(d)
    assert d.creds("orders")["password"] == password             # the saved pair did not change
    assert who(port, "orders", password, tmp_path) == new_user != lease_user
    with old.cursor() as cur:                                   # the old session goes on as before
        cur.execute("SELECT CURRENT_USER()")
        assert cur.fetchone()[0].split("@")[0] == lease_user
    old.close()

    bad = mariadb(port, "orders", "not-it", "SELECT 1", tmp_path)
    assert bad.returncode != 0 and "ERROR 1045" in bad.stderr
    d.cli("reset-password", "orders")
    fresh = d.creds("orders")["password"]
    assert fresh != password
    assert mariadb(port, "orders", password, "SELECT 1", tmp_path).returncode != 0
    assert who(port, "orders", fresh, tmp_path) == new_user
    log = d.paths.log_file.read_text(errors="replace")
    assert "wrong local user or password" in log                # logged, without any secret
    assert password not in log and fresh not in log and "not-it" not in log


def _lease_user(d) -> str:
    return d.creds("orders")["lease_user"]


def test_sysbench_through_the_local_login(stack, local_daemon):
    """(sysbench at a few hundred tps through the SSM stand-in's realistic 1 KB agent reads.)"""
    bench = pytest.importorskip("bench.workload")
    if not bench.available():
        pytest.skip("sysbench is not installed")
    orders = stack.clusters["orders"]
    admin = bench.Target("127.0.0.1", orders.port, orders.admin_user, orders.admin_password, orders.database)
    bench.prepare(admin, tables=1, table_size=1000)
    try:
        c = local_daemon.creds("orders")
        result = bench.run(bench.Target("127.0.0.1", c["port"], c["username"], c["password"], orders.database),
                           seconds=3, threads=4, tables=1, table_size=1000)
    finally:
        bench.cleanup(admin, tables=1)
    assert result.tps > 0 and result.errors == 0


def test_login_lease_passes_the_leased_user_through(stack, tmp_path):
    root, d = start_daemon(stack, login="lease")
    try:
        with d:
            d.start()
            d.sign_in()
            d.cli("connect", "orders", "--wait", "60")
            c = d.creds("orders")
            assert c["login"] == "lease" and c["username"] == c["lease_user"]
            assert who(c["port"], c["username"], c["password"], tmp_path) == c["username"]
            refused = d.cli("reset-password", "orders", check=False)
            assert refused.returncode != 0 and 'login = "lease"' in refused.stdout + refused.stderr
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_local_tls_from_the_config_with_the_real_daemon(stack, tmp_path):
    root, d = start_daemon(stack, login="local")
    d.write_config(d.config.replace('login = "local"', 'login = "local"\nlocal_tls = true', 1))
    try:
        with d:
            d.start()
            d.sign_in()
            d.cli("connect", "orders", "--wait", "60")
            c = d.creds("orders")
            cert = d.paths.state_dir / "local-tls-cert.pem"
            opts = tmp_path / "client.cnf"
            opts.write_text(f"[client]\npassword={c['password']}\n")
            opts.chmod(0o600)
            out = subprocess.run(["mariadb", f"--defaults-extra-file={opts}", "-h", "127.0.0.1", "-P", str(c["port"]),
                                  "-u", c["username"], "--ssl", f"--ssl-ca={cert}", "--ssl-verify-server-cert",
                                  "-e", "status"], capture_output=True, text=True, timeout=60)
            assert out.returncode == 0, out.stderr
            assert "Cipher in use" in out.stdout and c["lease_user"] in out.stdout
    finally:
        shutil.rmtree(root, ignore_errors=True)
