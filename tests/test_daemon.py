"""Daemon lifecycle with scripted units: single instance, reload validation, signals, systemd notify.

The daemon runs either in this process (serve_forever on a thread) or as a subprocess started by
pid (for signals), with DBTUNNELD_HOME and HOME in a private temporary folder. The same lifecycle
against the real engine and tunnels is covered in tests/test_cli.py on the sandbox stack.
"""

from __future__ import annotations

import os
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
from dbtunneld import errors
from dbtunneld.client import Client, DaemonNotRunning
from dbtunneld.daemon import AlreadyRunningError, Daemon, Factories, InstanceLock, sd_notify
from dbtunneld.paths import default_paths

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
from dbtunneld.daemon import Factories, run_daemon
from dbtunneld.paths import default_paths
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
        assert second.proc.wait(10) == 1
        assert f"already running (pid {first.proc.pid})" in second.proc.stderr.read()
    finally:
        second.kill()
    assert first.client.ping()


def test_invalid_config_at_start_exits_2(home):
    (home / "config.toml").write_text("[vault]\naddress = 'ftp://x'\n")
    env = dict(os.environ, DBTUNNELD_HOME=str(home), HOME=str(home))
    r = subprocess.run([sys.executable, "-m", "dbtunneld.cli", "daemon"], env=env, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "vault.address" in r.stderr and "Traceback" not in r.stderr
    assert not default_paths({"DBTUNNELD_HOME": str(home)}).socket_path.exists()


def wait_for(cond, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)
