"""The client: errors when no daemon answers, timeouts, event streams, and ensure_daemon starting one."""

from __future__ import annotations

import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

import fake_units as F
from dbtunneld.core import errors
from dbtunneld.core.paths import default_paths
from dbtunneld.process import client as C, control, protocol as P

TESTS = Path(__file__).resolve().parent
RUNNER = """
import sys
sys.path.insert(0, {tests!r})
import fake_units as F
from dbtunneld.core.paths import default_paths
from dbtunneld.process.daemon import Factories, run_daemon
sys.exit(run_daemon(default_paths(), sys.argv[1], foreground=False,
                    factories=Factories(F.engine_factory, F.tunnel_factory), stop_timeout=5))
"""


@pytest.fixture
def home(monkeypatch):
    d = Path(tempfile.mkdtemp(prefix="dbt-c-", dir="/tmp"))
    monkeypatch.setenv("DBTUNNELD_HOME", str(d))
    yield d
    shutil.rmtree(d, ignore_errors=True)


def test_no_daemon_is_a_clear_error(home):
    with pytest.raises(C.DaemonNotRunning) as info:
        C.Client().request("status")
    assert "dbtunneld daemon" in info.value.hint
    assert C.Client().ping() is False


def test_slow_answer_times_out(home):
    gate = threading.Event()

    def slow(req):
        gate.wait(10)
        return {}

    with control.ControlServer(default_paths().socket_path, slow) as srv:
        with pytest.raises(errors.TransientError) as info:
            C.Client(srv.path).request("status", timeout=0.3)
        assert "did not answer `status`" in info.value.message
        gate.set()


def test_subscription_yields_snapshot_then_events_and_closes(home):
    with control.ControlServer(default_paths().socket_path, lambda req: {"tunnels": []}) as srv:
        sub = C.Client(srv.path).subscribe()
        got = []
        t = threading.Thread(target=lambda: got.extend(sub))
        t.start()
        deadline = time.monotonic() + 5
        while srv.bus.subscribers == 0 or not got:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        srv.bus.publish("status", {"tunnels": [1]})
        while len(got) < 2:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sub.close()
        t.join(5)
    assert got == [P.Event("status", {"tunnels": []}), P.Event("status", {"tunnels": [1]})]


def test_daemon_closing_the_stream_ends_iteration_with_an_error(home):
    srv = control.ControlServer(default_paths().socket_path, lambda req: {}).start()
    sub = C.Client(srv.path).subscribe()
    events = iter(sub)
    assert next(events).event == "status"
    srv.close()
    with pytest.raises((C.DaemonNotRunning, StopIteration)):
        next(events)
    sub.close()


@pytest.fixture
def fake_daemon_command(monkeypatch, home):
    config = home / "config.toml"
    config.write_text(F.config_text([("orders", 13306, False)]))
    monkeypatch.setattr(C, "daemon_command",
                        lambda config_path=None: [sys.executable, "-c", RUNNER.format(tests=str(TESTS)), str(config)])
    yield config
    pid = _lock_pid(home)
    if pid:
        _kill(pid)


def test_ensure_daemon_starts_one_detached_and_reuses_it(fake_daemon_command, home):
    paths = default_paths()
    c = C.ensure_daemon(paths)
    st = c.request("status")
    pid = st["pid"]
    assert pid != os.getpid() and os.getsid(pid) != os.getsid(0)     # own session: no terminal signals
    assert C.ensure_daemon(paths).request("status")["pid"] == pid     # the second call starts nothing
    c.request("stop")
    deadline = time.monotonic() + 10
    while _alive(pid):
        assert time.monotonic() < deadline, "daemon did not stop"
        time.sleep(0.02)


def test_ensure_daemon_refuses_a_bad_config_before_starting(home):
    (home / "config.toml").write_text("[vault]\naddress = 'ftp://x'\n")
    with pytest.raises(errors.ConfigError) as info:
        C.ensure_daemon(default_paths(), timeout=20)
    assert any(p.path == "vault.address" for p in info.value.problems)
    assert not default_paths().log_file.exists()           # no daemon was started


def test_ensure_daemon_reports_why_the_daemon_died(home, monkeypatch):
    (home / "config.toml").write_text(F.config_text([("orders", 13306, False)]))
    monkeypatch.setattr(C, "daemon_command", lambda config_path=None: [
        sys.executable, "-c", "import logging, sys; from dbtunneld.adapters import log; log.setup_logging(sys.argv[1]); "
        "logging.getLogger('x').error('vault is on fire'); sys.exit(7)", str(default_paths().log_file)])
    with pytest.raises(C.DaemonStartError) as info:
        C.ensure_daemon(default_paths(), timeout=20)
    assert "exited with code 7: vault is on fire" in info.value.message
    assert str(default_paths().log_file) in info.value.hint


def _lock_pid(home: Path) -> int | None:
    try:
        return int((home / "run" / "daemon.lock").read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:                                   # a zombie of ours counts as gone
        done, _ = os.waitpid(pid, os.WNOHANG)
        return done == 0
    except ChildProcessError:
        return True


def _kill(pid: int) -> None:
    if _alive(pid):
        os.kill(pid, signal.SIGKILL)
