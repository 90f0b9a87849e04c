"""The CLI: rendering, exit codes and one-line errors (daemon on scripted units), then end to end
on the sandbox stack (connect, query through the stable port, creds, disconnect revokes the user)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pymysql
import pytest

import fake_units as F
from dbtunneld.core.paths import default_paths
from dbtunneld.process.daemon import Daemon, Factories
from dbtunneld.ui import cli, cli_commands, cli_output

NOW = 1_800_000_000.0


# ------------------------------------------------------------------ pure rendering

STATUS = {
    "aws": {"kind": "aws", "name": "dev", "state": "valid", "expires_at": NOW + 3 * 3600 + 120,
            "identity": "arn:aws:sts::1:assumed-role/dev/me"},
    "vault": {"kind": "vault", "name": "https://vault", "state": "backoff", "last_error": "timeout"},
    "tunnels": [
        {"name": "orders", "local_port": 13306, "state": "up", "since": NOW - 125, "username": "v-orders-1"},
        {"name": "billing", "local_port": 13307, "state": "backoff", "since": NOW - 5,
         "next_retry_at": NOW + 7, "last_error": "ssh: connection refused", "production": True},
        {"name": "audit", "local_port": 13308, "state": "failed", "last_error": "127.0.0.1:13308 is in use",
         "hint": "stop that process"},
    ],
    "health": "needs_action", "keyring": "memory only",
}


def test_render_status_table():
    text = cli_output.render_status(STATUS, NOW)
    lines = text.splitlines()
    assert lines[0].startswith("AWS    dev  valid  expires in 3h02m  arn:aws:sts::1:assumed-role/dev/me")
    assert "Vault  https://vault  backoff  timeout" == lines[1]
    assert lines[3].split() == ["NAME", "LOCAL", "STATE", "SINCE", "USER", "DETAIL"]
    assert lines[4].split() == ["orders", "127.0.0.1:13306", "up", "2m", "v-orders-1"]
    assert "retry in 7s: ssh: connection refused" in lines[5]
    assert "127.0.0.1:13308 is in use (hint: stop that process)" in lines[6]
    assert lines[-1] == "keyring: memory only"


@pytest.mark.parametrize("change,code", [
    ({}, 5),
    ({"health": "ok", "tunnels": []}, 0),
    ({"health": "idle", "tunnels": []}, 0),
    ({"aws": {"state": "needs_sign_in"}}, 4),
])
def test_status_exit_code(change, code):
    assert cli_output.status_exit_code({**STATUS, **change}) == code


def test_render_creds_never_shows_the_password():
    c = {"name": "orders", "port": 13306, "database": "app", "username": "v-1", "password": "hunter22",
         "mysql": "mysql -h 127.0.0.1 -P 13306 -u v-1 -p app", "url": "mysql://v-1@127.0.0.1:13306/app",
         "jdbc": "jdbc:mysql://127.0.0.1:13306/app?user=v-1", "expires_at": NOW + 600, "production": True}
    text = cli_output.render_creds(c, NOW)
    assert "hunter22" not in text
    assert "--field password" in text and "PRODUCTION" in text and "expires   in 10m" in text


# ------------------------------------------------------------------ the CLI against scripted units

@pytest.fixture
def fake_daemon(monkeypatch):
    home = Path(tempfile.mkdtemp(prefix="dbt-cli-", dir="/tmp"))
    monkeypatch.setenv("DBTUNNELD_HOME", str(home))
    paths = default_paths()
    (home / "config.toml").write_text(F.config_text([("orders", 13306, True), ("busy1", 13307, False)]))
    d = Daemon(paths, home / "config.toml", Factories(F.engine_factory, F.tunnel_factory), stop_timeout=5).start()
    t = threading.Thread(target=d.serve_forever, daemon=True)
    t.start()
    yield d
    d.request_stop()
    t.join(5)
    d.shutdown()
    shutil.rmtree(home, ignore_errors=True)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_status_connect_creds_disconnect(fake_daemon, capsys):
    code, out, _ = run(capsys, "status")
    assert code == 0 and "orders" in out and "busy1" in out
    code, out, _ = run(capsys, "status", "--json")
    assert json.loads(out)["tunnels"][0]["state"] == "up"
    code, out, _ = run(capsys, "creds", "orders")
    assert code == 0 and "secret-pw" not in out and "mysql -h 127.0.0.1 -P 13306 -u v-orders-" in out
    code, out, _ = run(capsys, "creds", "orders", "--field", "password")
    assert code == 0 and out.strip().startswith("secret-pw-")
    code, out, _ = run(capsys, "creds", "orders", "--json")
    assert "password" not in json.loads(out)
    code, out, _ = run(capsys, "reconnect")
    assert code == 0 and out.strip() == "reconnecting: orders"
    code, out, _ = run(capsys, "disconnect", "orders")
    assert code == 0 and out.strip() == "orders: disconnected (credentials revoked)"


def test_connect_failure_exits_5_with_the_reason(fake_daemon, capsys):
    code, out, _ = run(capsys, "connect", "busy1", "--wait", "5")
    assert code == 5
    assert "busy1: failed on 127.0.0.1:13307: 127.0.0.1:13307 is already in use by pid 1 (init)" in out


@pytest.mark.parametrize("argv,code,text", [
    (("connect", "nope"), 2, 'no cluster named "nope"'),
    (("creds", "busy1"), 1, "dbtunneld connect busy1"),
    (("disconnect",), 2, "name a cluster or pass --all"),
])
def test_errors_are_one_line_with_a_hint(fake_daemon, capsys, argv, code, text):
    got, out, err = run(capsys, *argv)
    assert got == code and text in err
    assert len(err.strip().splitlines()) == 1 and "hint:" in err and "Traceback" not in err


def test_reload_with_a_bad_config_exits_2_listing_problems(fake_daemon, capsys):
    fake_daemon.config_path.write_text(F.config_text([("orders", 13306, True)]).replace('role = "dev"', ""))
    code, _, err = run(capsys, "reload")
    assert code == 2 and "vault.role: is required" in err
    assert run(capsys, "status")[0] == 0             # still running the old config


def test_no_daemon_exits_3(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DBTUNNELD_HOME", str(tmp_path))
    for argv in (("status",), ("disconnect", "--all"), ("stop",), ("reload",), ("creds", "x")):
        code, _, err = run(capsys, *argv)
        assert code == 3 and "no dbtunneld daemon is listening" in err


def test_internal_error_prints_one_line_and_logs_the_traceback(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("DBTUNNELD_HOME", str(tmp_path))
    monkeypatch.setattr(cli_commands, "cmd_status", lambda args: 1 / 0)
    code, _, err = run(capsys, "status")
    assert code == 1 and err.count("\n") == 1
    assert "internal error: ZeroDivisionError" in err and "Traceback" not in err
    log_text = (tmp_path / "log" / "cli.log").read_text()
    assert "Traceback" in log_text and "ZeroDivisionError" in log_text


def test_copy_without_a_clipboard_module_is_a_clear_message(fake_daemon, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_clipboard(name, *a, **kw):
        if name == "clipboard" or name.endswith(".clipboard"):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_clipboard)
    code, _, err = run(capsys, "creds", "orders", "--copy")
    assert code == 1 and "clipboard" in err and "--field" in err


# ------------------------------------------------------------------ end to end on the stack

@pytest.fixture
def daemon(stack):
    from dbtunneld.sandbox.daemonproc import DaemonUnderTest

    root = Path(tempfile.mkdtemp(prefix="dbt-e2e-", dir="/tmp"))
    with DaemonUnderTest(stack, root) as d:
        yield d
    shutil.rmtree(root, ignore_errors=True)


def test_end_to_end_connect_query_creds_disconnect(stack, daemon):
    daemon.sign_in()                                      # `dbtunneld login` starts the daemon
    port = daemon.configured_port("orders")
    out = daemon.cli("connect", "orders").stdout
    assert out.startswith(f"orders: up on 127.0.0.1:{port} as v-")

    shown = daemon.cli("creds", "orders").stdout
    password = daemon.cli("creds", "orders", "--field", "password").stdout.strip()
    user = daemon.cli("creds", "orders", "--field", "username").stdout.strip()
    assert password and password not in shown and user in shown
    assert f"mysql -h 127.0.0.1 -P {port} -u {user} -p" in shown

    db = stack.clusters["orders"]
    conn = pymysql.connect(host="127.0.0.1", port=port, user=user, password=password, database=db.database)
    with conn, conn.cursor() as cur:
        cur.execute(f"SELECT COUNT(*) FROM {db.table}")
        assert cur.fetchone()[0] > 0
    lease_user = daemon.cli("creds", "orders", "--field", "lease_user").stdout.strip()
    assert lease_user in stack.dynamic_users("orders")  # login = "local": the port logs in as the lease
    assert password not in daemon.log_text()              # no secret in any log line

    assert daemon.cli("disconnect", "orders").stdout.strip() == "orders: disconnected (credentials revoked)"
    assert lease_user not in stack.dynamic_users("orders")   # the leased user is gone from MariaDB itself
    st = json.loads(daemon.cli("status", "--json").stdout)
    assert {t["name"]: t["state"] for t in st["tunnels"]}["orders"] == "stopped"


def test_end_to_end_not_signed_in_exits_4_with_the_fix(daemon):
    daemon.start()
    r = daemon.cli("connect", "orders", "--wait", "20", check=False)
    assert r.returncode == 4, r.stdout + r.stderr
    assert "needs_sign_in" in r.stdout and "dbtunneld login" in r.stdout
    r = daemon.cli("creds", "orders", check=False)
    assert r.returncode == 4 and r.stderr.count("hint:") == 1
    assert daemon.cli("status", check=False).returncode == 4


def test_end_to_end_stop_revokes_everything(stack, daemon):
    daemon.sign_in()
    daemon.cli("connect", "--all")
    users = [daemon.cli("creds", n, "--field", "lease_user").stdout.strip() for n in ("orders", "billing")]
    assert set(users) <= set(stack.dynamic_users())
    out = daemon.cli("stop").stdout
    for user in users:
        assert f": user {user} revoked\n" in out
    assert "daemon stopped" in out and out.rstrip().endswith("every DB user revoked")
    assert not set(users) & set(stack.dynamic_users())
    assert daemon.cli("status", check=False).returncode == 3


def test_end_to_end_without_revoke_rights_disconnect_and_stop_say_what_was_revoked(make_stack):
    from dbtunneld.sandbox.daemonproc import DaemonUnderTest

    stack = make_stack(lease_revoke=False, ssm=False)              # the policy lacks sys/leases/revoke
    root = Path(tempfile.mkdtemp(prefix="dbt-e2e-", dir="/tmp"))
    try:
        with DaemonUnderTest(stack, root) as daemon:
            daemon.sign_in()
            daemon.cli("connect", "--all")
            users = {n: daemon.cli("creds", n, "--field", "lease_user").stdout.strip() for n in ("orders", "billing")}
            out = daemon.cli("disconnect", "orders").stdout
            assert out.startswith("orders: disconnected\n"), out
            assert (f"orders: user {users['orders']} NOT revoked (Vault's policy does not allow sys/leases/revoke);"
                    f" it stays valid until ") in out
            assert 'hint: ask your Vault admin to add path "sys/leases/revoke" { capabilities = ["update"] }' in out
            assert users["orders"] in stack.dynamic_users("orders")           # Vault refused: it lingers
            out = daemon.cli("stop").stdout
            assert f"billing: user {users['billing']} revoked (with the Vault token that created it)" in out
            assert out.rstrip().endswith("every DB user revoked"), out
            end = time.monotonic() + 15
            while users["billing"] in stack.dynamic_users("billing") and time.monotonic() < end:
                time.sleep(0.1)
            assert users["billing"] not in stack.dynamic_users("billing")
            assert daemon.log_text().count(f'cannot revoke user {users["orders"]}') == 1
    finally:
        shutil.rmtree(root, ignore_errors=True)


# ------------------------------------------------------------------ `dbtunneld sandbox` runs the daemon

def _free_pair() -> int:
    from dbtunneld.adapters.ports import port_is_free

    import random
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 30000)
        if port_is_free(base) and port_is_free(base + 1):
            return base
    raise AssertionError("no two consecutive free ports")


@pytest.mark.slow
def test_sandbox_runs_the_daemon_and_ctrl_c_leaves_nothing():
    import re
    import signal
    import socket
    import subprocess
    import sys

    base = _free_pair()
    holder = socket.socket()
    holder.bind(("127.0.0.1", base))                 # the first wanted port is busy: it must say so
    holder.listen()
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    proc = subprocess.Popen([sys.executable, "-m", "dbtunneld.ui.cli", "sandbox", "--base-port", str(base)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    daemon_pid = None
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("Ctrl-C stops the daemon"):
                break
        text = "".join(lines)
        assert "Ctrl-C stops" in text, text
        assert f"127.0.0.1:{base} is in use by pid {os.getpid()}" in text
        assert f"billing  127.0.0.1:{base + 1}" in text
        home = re.search(r"export DBTUNNELD_HOME=(\S+)", text).group(1)
        daemon_pid = int(re.search(r"dbtunneld daemon: pid (\d+)", text).group(1))
        mysql_cmd = re.search(r"(mysql -h 127\.0\.0\.1 -P (\d+) -u (\S+) -p orders)", text)
        assert "-p orders" in mysql_cmd.group(1) and "password" not in mysql_cmd.group(1)

        other = dict(os.environ, DBTUNNELD_HOME=home)           # "in another terminal"
        pw = subprocess.run([sys.executable, "-m", "dbtunneld.ui.cli", "creds", "orders", "--field", "password"],
                            env=other, capture_output=True, text=True, timeout=60).stdout.strip()
        conn = pymysql.connect(host="127.0.0.1", port=int(mysql_cmd.group(2)), user=mysql_cmd.group(3),
                               password=pw, database="orders")
        with conn, conn.cursor() as cur:
            cur.execute("SELECT CURRENT_USER()")
            assert cur.fetchone()[0].startswith("v-")          # the local pair logs in as the lease

        os.kill(proc.pid, signal.SIGINT)
        rest = proc.stdout.read()
        assert proc.wait(60) == 0, rest
        assert "the daemon revoked every DB user it made" in rest and "no process or file left behind" in rest
        assert not os.path.exists(home)
        with pytest.raises(ProcessLookupError):
            os.kill(daemon_pid, 0)
    finally:
        holder.close()
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        if daemon_pid is not None:
            try:
                os.kill(daemon_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


BROWSER_SCRIPT = "import sys, urllib.request\nurllib.request.urlopen(sys.argv[1], timeout=30).read()\n"


def test_login_uses_the_browser_with_pkce_and_falls_back_to_the_device_code_when_headless(stack, daemon, tmp_path):
    """`dbtunneld login` as `aws sso login`: the authorization-code flow in the browser ($BROWSER
    here: a script that loads the page; the stand-in approves and redirects to the daemon's
    loopback listener); without a display, the device code (the browser is not touched)."""
    import json
    import sys
    import time

    browser = tmp_path / "browser.py"
    browser.write_text(BROWSER_SCRIPT)
    daemon.env["BROWSER"] = f"{sys.executable} {browser} %s"
    for key in ("DISPLAY", "WAYLAND_DISPLAY"):
        daemon.env.pop(key, None)
    stack.sso.auto_approve(True)
    try:
        before = stack.sso.state()["auth_requests"]
        out = daemon.cli("login", "--wait", "60").stdout
        assert "confirm the code" in out and "signed in" in out
        assert stack.sso.state()["auth_requests"] == before
        entry = json.loads(daemon.sso_cache_file().read_text())     # the SSO session ends
        entry["expiresAt"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 60))
        entry["refreshToken"] = "ended-session-refresh-token"
        daemon.sso_cache_file().write_text(json.dumps(entry))
        daemon.env["DISPLAY"] = ":0"
        out = daemon.cli("login", "--wait", "60").stdout
        assert "Sign in in the browser" in out and "signed in" in out
        assert stack.sso.state()["auth_requests"] == before + 1
        assert json.loads(daemon.sso_cache_file().read_text())["refreshToken"] != "ended-session-refresh-token"
    finally:
        stack.sso.auto_approve(False)


def test_status_labels_the_vault_accessor_and_shows_the_aurora_role():
    st = {**STATUS, "vault": {"kind": "vault", "name": "https://vault", "state": "valid", "identity": "hmac-acc-1"},
          "tunnels": [{"name": "orders", "local_port": 13306, "state": "up", "role": "writer", "expected_role": "writer"},
                      {"name": "orders-reader", "local_port": 13307, "state": "up", "role": "writer",
                       "expected_role": "reader"}]}
    lines = cli_output.render_status(st, NOW).splitlines()
    assert lines[1] == "Vault  https://vault  valid  accessor hmac-acc-1"
    assert lines[4].split()[-1] == "writer"
    assert lines[5].endswith("reader port answers as a writer (failover?)")
