"""SSM session ids persisted (0600, ids only) and terminated at the next daemon start after a crash.

Unit tests on the registry file, then the whole daemon on the sandbox stack: an
ssm-port-forward tunnel up, the daemon SIGKILLed, a fresh daemon started; the SSM stand-in
must see TerminateSession for the session the dead daemon left open.
"""

from __future__ import annotations

import json
import signal
import stat
import subprocess
import sys
import time

import pytest

from dbtunneld.adapters.ssm import session_registry as R
from dbtunneld.core.errors import NeedsUserError, TransientError
from dbtunneld.sandbox.daemonproc import DaemonOptions, DaemonUnderTest


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_file_is_private_and_holds_ids_and_pids_only(tmp_path):
    registry = R.SessionRegistry(tmp_path / "state" / R.FILE_NAME)
    registry.add("alice-0123")
    registry.add("alice-4567")
    registry.remove("alice-0123")
    assert stat.S_IMODE((tmp_path / "state" / R.FILE_NAME).stat().st_mode) == 0o600
    data = json.loads((tmp_path / "state" / R.FILE_NAME).read_text())
    assert data["sessions"] == [{"id": "alice-4567", "pid": registry.pid}]
    assert registry.ids() == ["alice-4567"]


def test_leftovers_are_sessions_of_dead_daemons_only(tmp_path):
    path = tmp_path / R.FILE_NAME
    R.SessionRegistry(path, pid=_dead_pid()).add("crashed-1")
    me = R.SessionRegistry(path)
    me.add("mine-1")
    assert me.leftovers() == ["crashed-1"]


def test_terminate_leftovers_keeps_what_failed_transiently(tmp_path):
    path = tmp_path / R.FILE_NAME
    dead = R.SessionRegistry(path, pid=_dead_pid())
    for sid in ("ok-1", "gone-2", "flaky-3"):
        dead.add(sid)
    called = []

    def terminate(sid: str) -> None:
        called.append(sid)
        if sid == "gone-2":
            raise NeedsUserError("DoesNotExistException")
        if sid == "flaky-3":
            raise TransientError("network down")

    me = R.SessionRegistry(path)
    assert R.terminate_leftovers(me, terminate) == ["flaky-3"]
    assert called == ["ok-1", "gone-2", "flaky-3"] and me.ids() == ["flaky-3"]


def _standin_sessions(stack) -> dict[str, dict]:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{stack.ssm.port}/_standin/sessions", timeout=10) as resp:
        table = json.load(resp)
    rows = table.get("sessions", table) if isinstance(table, dict) else table
    return {r["SessionId"]: r for r in rows}


def _eventually(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.2)
    return check()


def test_daemon_sigkilled_its_ssm_session_is_terminated_at_the_next_start(stack, tmp_path):
    if stack.ssm is None:
        pytest.skip("the sandbox stack has no SSM stand-in")
    name = next(iter(stack.info.clusters))
    with DaemonUnderTest(stack, tmp_path / "daemon", DaemonOptions(clusters=(name,), transport="ssm-port-forward")) as d:
        d.start()
        d.sign_in()
        d.cli("connect", name, "--wait", "45")
        d.wait_up([name], 60)
        registry = R.SessionRegistry(d.paths.state_dir / R.FILE_NAME)
        old = registry.ids()
        assert len(old) == 1
        text = (d.paths.state_dir / R.FILE_NAME).read_text()
        assert "ws://" not in text and "Token" not in text
        assert _standin_sessions(stack)[old[0]]["Status"] in ("Connected", "Connecting")
        d.kill(signal.SIGKILL)
        time.sleep(0.5)
        assert _standin_sessions(stack)[old[0]]["Reason"] == ""      # still open at "AWS"
        d.start()
        ended = _eventually(lambda: _standin_sessions(stack)[old[0]]["Reason"] == "terminated by TerminateSession", 30)
        assert ended, _standin_sessions(stack)[old[0]]
        assert _eventually(lambda: old[0] not in registry.ids(), 10)
        assert d.stop()
