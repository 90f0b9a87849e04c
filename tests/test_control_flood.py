"""1000 idle connections to a real daemon's control socket do not lock its owner out (issue 15,
point 4): `dbtunneld status` still answers at once, and the tray's event stream keeps flowing."""

from __future__ import annotations

import resource
import socket
import time

import pytest

from dbtunneld.sandbox.daemonproc import DaemonUnderTest

IDLE_CONNECTIONS = 1000


@pytest.fixture
def enough_fds():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = IDLE_CONNECTIONS + 512
    if hard != resource.RLIM_INFINITY and hard < want:
        pytest.skip(f"RLIMIT_NOFILE hard limit {hard} < {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_1000_idle_connections_do_not_block_status(stack, tmp_path, enough_fds):
    with DaemonUnderTest(stack, tmp_path / "d") as d:
        d.start()
        sub = d.client.subscribe()
        events = iter(sub)
        assert next(events).event == "status"
        idle = []
        try:
            for _ in range(IDLE_CONNECTIONS):
                s = socket.socket(socket.AF_UNIX)
                s.connect(str(d.paths.socket_path))     # blocking: waits while the backlog is full
                idle.append(s)
            started = time.monotonic()
            r = d.cli("status", check=False, timeout=60)
            took = time.monotonic() - started
            print(f"`dbtunneld status` with {IDLE_CONNECTIONS} idle connections: exit {r.returncode} in {took:.2f} s")
            # answered: the table of tunnels (exit 4 = not signed in yet, which is the truth here)
            assert r.returncode in (0, 4) and "billing  127.0.0.1:" in r.stdout, r.stdout + r.stderr
            assert took < 10
            d.cli("connect", "orders", check=False, timeout=60)     # something the stream reports
            assert next(events).event in ("status", "credentials"), "the subscriber was not dropped"
        finally:
            for s in idle:
                s.close()
            sub.close()
