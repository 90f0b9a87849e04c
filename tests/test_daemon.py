"""Daemon lifecycle with scripted units: single instance, reload validation, signals, systemd notify.

The daemon runs either in this process (serve_forever on a thread) or as a subprocess started by
pid (for signals), with DBTUNNELD_HOME and HOME in a private temporary folder. The same lifecycle
against the real engine and tunnels is covered in tests/test_cli.py on the sandbox stack.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import fake_units as F
from dbtunneld.core import errors
from dbtunneld.core.paths import default_paths
from dbtunneld.process.client import Client, DaemonNotRunning
from dbtunneld.process.daemon import AlreadyRunningError, Daemon, Factories, InstanceLock, sd_notify

TESTS = Path(__file__).resolve().parent
FAKES = Factories(F.engine_factory, F.tunnel_factory)


@pytest.fixture
def home():
    d = Path(tempfile.mkdtemp(prefix="dbt-d-", dir="/tmp"))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def write_config(home: Path, clusters) -> Path:
    path = home / "config.toml"
    path.write_text(F.config_text(clusters))
    return path


@pytest.fixture
def running(home):
    """An in-process daemon serving on a thread; stopped at the end whatever happens."""
    paths = default_paths({"DBTUNNELD_HOME": str(home)})
    cfg = write_config(home, [("orders", 13306, True), ("billing", 13307, False)])
    d = Daemon(paths, cfg, FAKES, stop_timeout=5).start()
    t = threading.Thread(target=d.serve_forever, daemon=True)
    t.start()
    yield d, Client(paths.socket_path, timeout=10)
    d.request_stop()
    t.join(5)
    d.shutdown()


def test_serves_status_and_commands(running):
    d, c = running
    st = c.request("status")
    assert st["pid"] == os.getpid() and [t["state"] for t in st["tunnels"]] == ["up", "stopped"]
    assert c.request("connect", name="billing", wait=5)["tunnels"][0]["state"] == "up"
    creds = c.request("creds", name="billing")
    assert "password" not in creds and creds["port"] == 13307
    assert c.request("creds", name="billing", field="password")["password"].startswith("secret-pw-")
    assert c.request("disconnect", all=True)["disconnected"] == ["orders", "billing"]
    with pytest.raises(errors.UnknownNameError):
        c.request("connect", name="nope")


def test_socket_and_lock_files(running):
    d, c = running
    assert stat.S_IMODE(os.stat(d.paths.socket_path).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(d.paths.runtime_dir).st_mode) == 0o700
    assert InstanceLock(d.paths.lock_path).holder_pid() == os.getpid()


def test_second_instance_is_refused(running):
    d, c = running
    other = Daemon(d.paths, d.config_path, FAKES)
    with pytest.raises(AlreadyRunningError) as info:
        other.start()
    assert f"pid {os.getpid()}" in info.value.message
    assert c.request("status")            # the first one is untouched


def test_reload_refuses_bad_config_whole(running):
    d, c = running
    before = c.request("status")["tunnels"]
    d.config_path.write_text(F.config_text([("orders", 13399, True)]).replace('role = "dev"', "role = 5"))
    with pytest.raises(errors.ConfigError) as info:
        c.request("reload")
    assert any(p.path == "vault.role" for p in info.value.problems)
    assert c.request("status")["tunnels"] == before


def test_reload_good_config_reconciles(running):
    d, c = running
    write_config(d.config_path.parent, [("orders", 13306, True), ("audit", 13308, True)])
    summary = c.request("reload")
    assert summary == {"kept": ["orders"], "stopped": ["billing"], "restarted": [], "started": ["audit"]}
    assert {t["name"]: t["state"] for t in c.request("status")["tunnels"]} == {"orders": "up", "audit": "up"}


def test_stop_command_ends_the_daemon_and_cleans_up(home):
    paths = default_paths({"DBTUNNELD_HOME": str(home)})
    d = Daemon(paths, write_config(home, [("orders", 13306, True)]), FAKES, stop_timeout=5).start()
    engine = d.supervisor._engine
    t = threading.Thread(target=d.serve_forever)
    t.start()
    assert Client(paths.socket_path).request("stop")["pid"] == os.getpid()
    t.join(5)
    assert not t.is_alive()
    assert d.shutdown() is True
    assert engine.revoked == ["orders"] and not paths.socket_path.exists()
    assert d.server.engine is d.engine and d.bus.engine is d.engine
    deadline = time.monotonic() + 2                   # the loop's thread and its pool end with shutdown
    while [t for t in threading.enumerate() if t.name.startswith(d.engine.name)]:
        assert time.monotonic() < deadline, "the engine loop's threads outlived the daemon"
        time.sleep(0.01)
    with pytest.raises(DaemonNotRunning):
        Client(paths.socket_path).request("status")
    InstanceLock(paths.lock_path).acquire().release()       # the lock is free again


def test_sd_notify_sends_datagrams(home):
    path = home / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        assert sd_notify("READY=1", {"NOTIFY_SOCKET": str(path)})
        assert s.recv(100) == b"READY=1"
    assert not sd_notify("READY=1", {})


def test_sd_notify_abstract_namespace():
    name = f"dbt-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        assert sd_notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name})
        assert s.recv(100) == b"STOPPING=1"


# ----------------------------------------------------------------------------- as a process

RUNNER = """
import sys
sys.path.insert(0, {tests!r})
import fake_units as F
from dbtunneld.core.paths import default_paths
from dbtunneld.process.daemon import Factories, run_daemon
sys.exit(run_daemon(default_paths(), {config!r}, factories=Factories(F.engine_factory, F.tunnel_factory), stop_timeout=5))
"""


class DaemonProcess:
    def __init__(self, home: Path, config: Path):
        self.home, self.events = home, home / "fake-units.log"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify_path = Path(tempfile.mktemp(prefix="notify-", dir=home))
        self.notify.bind(str(notify_path))
        self.notify.settimeout(10)
        env = dict(os.environ, DBTUNNELD_HOME=str(home), HOME=str(home), FAKE_UNITS_LOG=str(self.events),
                   NOTIFY_SOCKET=str(notify_path))
        self.proc = subprocess.Popen([sys.executable, "-c", RUNNER.format(tests=str(TESTS), config=str(config))],
                                     env=env, stderr=subprocess.PIPE, text=True, start_new_session=True)
        self.paths = default_paths({"DBTUNNELD_HOME": str(home)})
        self.client = Client(self.paths.socket_path, timeout=10)

    def ready(self) -> "DaemonProcess":
        assert self.notify.recv(100) == b"READY=1"
        assert self.client.ping()
        return self

    def log(self) -> list[str]:
        return self.events.read_text().split("\n") if self.events.exists() else []

    def kill(self):
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        self.notify.close()


@pytest.fixture
def proc(home):
    procs = []

    def start(clusters=(("orders", 13306, True),)):
        p = DaemonProcess(home, write_config(home, list(clusters)))
        procs.append(p)
        return p

    yield start
    for p in procs:
        p.kill()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_gracefully(proc, sig):
    p = proc([("orders", 13306, True), ("billing", 13307, True)]).ready()
    os.kill(p.proc.pid, sig)
    assert p.proc.wait(10) == 0
    assert p.notify.recv(100) == b"STOPPING=1"
    log = p.log()
    assert {"revoke orders", "revoke billing"} <= set(log)
    assert max(log.index("tunnel-stop orders"), log.index("tunnel-stop billing")) < log.index("engine-stop http://127.0.0.1:8200")
    assert not p.paths.socket_path.exists()
    assert "stopping" in p.proc.stderr.read()


def test_sighup_refuses_bad_config_then_applies_good(proc):
    p = proc().ready()
    p.home.joinpath("config.toml").write_text("[vault\n")
    os.kill(p.proc.pid, signal.SIGHUP)
    wait_for(lambda: "reload refused" in p.paths.log_file.read_text())
    assert [t["state"] for t in p.client.request("status")["tunnels"]] == ["up"]
    write_config(p.home, [("orders", 13306, True), ("audit", 13309, True)])
    os.kill(p.proc.pid, signal.SIGHUP)
    wait_for(lambda: len(p.client.request("status")["tunnels"]) == 2)
    assert "tunnel-start audit" in p.log()
    assert p.proc.poll() is None


def test_second_daemon_process_exits_with_a_clear_message(proc):
    first = proc().ready()
    second = DaemonProcess(first.home, first.home / "config.toml")
    try:
        assert second.proc.wait(10) == 6                 # not 1: login managers must not restart it
        assert f"already running (pid {first.proc.pid})" in second.proc.stderr.read()
    finally:
        second.kill()
    assert first.client.ping()


def test_invalid_config_at_start_exits_2(home):
    (home / "config.toml").write_text("[vault]\naddress = 'ftp://x'\n")
    env = dict(os.environ, DBTUNNELD_HOME=str(home), HOME=str(home))
    r = subprocess.run([sys.executable, "-m", "dbtunneld.ui.cli", "daemon"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "vault.address" in r.stderr and "Traceback" not in r.stderr
    assert not default_paths({"DBTUNNELD_HOME": str(home)}).socket_path.exists()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


# ----------------------------------------------------------------------------- on the sandbox stack

def _daemon_under_test(stack, **options):
    from dbtunneld.sandbox.daemonproc import DaemonOptions, DaemonUnderTest

    root = Path(tempfile.mkdtemp(prefix="dbt-dmn-", dir="/tmp"))
    return root, DaemonUnderTest(stack, root, DaemonOptions(**options))


@pytest.fixture
def connected(stack):
    """A real daemon on the stack, signed in, with every cluster connected."""
    root, d = _daemon_under_test(stack)
    with d:
        d.start()
        d.sign_in()
        d.cli("connect", "--all")
        yield d
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def live(stack):
    """One connected daemon shared by the tests that only poke at it (uid check, fuzz)."""
    root, d = _daemon_under_test(stack)
    with d:
        d.start()
        d.sign_in()
        d.cli("connect", "orders")
        yield d
    shutil.rmtree(root, ignore_errors=True)


def mysql(d, name: str):
    import pymysql

    c = d.creds(name)
    return pymysql.connect(host="127.0.0.1", port=c["port"], user=c["username"], password=c["password"],
                           database=c["database"] or None, connect_timeout=10, read_timeout=10)


def query_ok(conn) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT 1")
        return cur.fetchone() == (1,)


def lease_alive(stack, lease_id: str) -> bool:
    try:
        stack.root_vault().write("sys/leases/lookup", {"lease_id": lease_id})
        return True
    except RuntimeError as exc:
        assert "invalid lease" in str(exc) or " 400 " in str(exc), exc
        return False


def persisted_leases(d) -> list[dict]:
    import json

    data = json.loads(d.paths.leases_file.read_text()) if d.paths.leases_file.exists() else {}
    records = data.get("leases", data) if isinstance(data, dict) else data
    return list(records.values()) if isinstance(records, dict) else list(records)


def test_sigterm_leaves_no_lease_in_vault_and_no_user_in_mariadb(stack, connected):
    d = connected
    leases = [r["lease_id"] for r in persisted_leases(d)]
    users = [d.creds(n)["lease_user"] for n in ("orders", "billing")]
    assert len(leases) == 2 and all(lease_alive(stack, lid) for lid in leases)
    assert set(users) <= set(stack.dynamic_users())
    os.kill(d.pid, signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert not any(lease_alive(stack, lid) for lid in leases)
    assert not set(users) & set(stack.dynamic_users())
    assert persisted_leases(d) == []
    assert not d.paths.socket_path.exists()


def test_reload_bad_config_keeps_traffic_then_good_one_reconciles(stack, connected):
    d = connected
    conn = mysql(d, "orders")
    billing_user = d.creds("billing")["username"]
    good = d.config
    d.write_config(re.sub(r"local_port = \d+", "local_port = 1", good, count=1))   # invalid: port < 1024
    r = d.cli("reload", check=False)
    assert r.returncode == 2 and "local_port" in r.stderr
    assert query_ok(conn)                                  # the same session still flows
    assert query_ok(mysql(d, "orders"))                    # and new ones too

    without_billing = good[:good.index('[[clusters]]\nname = "billing"')]
    d.write_config(without_billing)
    out = d.cli("reload").stdout
    assert out.strip() == "reloaded: stopped billing"
    assert query_ok(conn)                                  # orders was kept: its session survived
    assert [t["name"] for t in d.status()["tunnels"]] == ["orders"]
    assert billing_user not in stack.dynamic_users("billing")
    conn.close()


@pytest.mark.skipif(os.getuid() != 0, reason="needs root to run a client as another uid")
def test_another_uid_is_refused_by_the_real_daemon(live):
    import test_control

    d = live
    for path in (d.root, d.dbt_home, d.paths.runtime_dir):  # let uid 65534 reach the socket at all
        os.chmod(path, 0o711)
    os.chmod(d.paths.socket_path, 0o666)
    try:
        import json

        reply = json.loads(test_control._connect_as_nobody(d.paths.socket_path).splitlines()[0])
    finally:
        os.chmod(d.paths.runtime_dir, 0o700)
        os.chmod(d.paths.socket_path, 0o600)
    assert reply["error"]["kind"] == "permission_denied" and "uid 65534" in reply["error"]["message"]
    assert d.status()["tunnels"][0]["state"] == "up"       # `stop` never reached it
    assert "uid 65534" in d.log_text()


def test_protocol_fuzz_leaves_the_daemon_and_its_tunnels_up(live):
    import random

    from dbtunneld.process import protocol as P

    d = live
    rng = random.Random(6)
    payloads = [bytes(rng.randrange(256) for _ in range(rng.randrange(1, 4000))) for _ in range(25)]
    payloads += [b'{"v":1,"id":1,"cmd":"conn', b"\n" * 1000, b"{" * 70000 + b"\n",
                 b"x" * (P.MAX_REQUEST_BYTES + 10) + b"\n" + P.encode_request(3, "status"),
                 b'{"v":1,"id":2,"cmd":"format_disk","args":{}}\n', b'{"v":1,"id":2,"cmd":"creds","args":{"name":7}}\n',
                 b'{"v":2,"id":2,"cmd":"stop"}\n', b'{"v":1,"id":2,"cmd":"stop","args":{"now":true}}\n']
    answered = 0
    for blob in payloads:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(10)
            s.connect(str(d.paths.socket_path))
            try:
                s.sendall(blob)
                s.shutdown(socket.SHUT_WR)
                while chunk := s.recv(65536):
                    answered += chunk.count(b'"ok":false')
            except OSError:
                pass                                       # dropped: allowed
    assert answered >= 8
    assert d.proc.poll() is None
    st = d.status()
    assert st["tunnels"][0]["state"] == "up"
    assert query_ok(mysql(d, "orders"))
