"""Session Manager's idle timeout, handled on purpose (issue 14, point 4), measured against the
SSM stand-in in realistic mode with a 2 s idle timeout (the real default is 20 min).

A tunnel over ``ssm-port-forward`` keeps its stable port bound while the service closes the
idle session; it starts a new session at once (no backoff, no user action); a client connection
that was open on the closed session ends, and the log says why in words; a new connection to
the same port works.
"""

from __future__ import annotations

import logging
import socket
import time

import boto3
import pytest

from dbtunneld.adapters.mysqlwire import ProbeResult
from dbtunneld.adapters.transport import SsmPortForwardTransport
from dbtunneld.core.config import TunnelSettings
from dbtunneld.core.model import TunnelState
from dbtunneld.engine.tunnel import Tunnel
from dbtunneld.sandbox.ssm_testkit import DataServer, StandInProcess, pattern_digest, upload

TARGET = "i-0123456789abcdef0"
CREDENTIALS = {"AKIDSSMIDLETEST": "secret-ssm-idle-test"}
IDLE = 2.0
SETTINGS = TunnelSettings(connect_wait=20, health_interval=600, health_timeout=2, keepalive_interval=0.5, backoff_initial=0.2, backoff_max=2)


def aws() -> boto3.Session:
    return boto3.Session(aws_access_key_id="AKIDSSMIDLETEST", aws_secret_access_key="secret-ssm-idle-test", region_name="us-east-1")


@pytest.fixture
def data_server():
    server = DataServer()
    yield server
    server.close()


@pytest.fixture
def standin(data_server, tmp_path):
    proc = StandInProcess("--target", f"{TARGET}=127.0.0.1:{data_server.port}", "--allow-remote", "127.0.0.1", "--idle-timeout", str(IDLE),
                          log_path=str(tmp_path / "standin.log"), credentials=CREDENTIALS)
    proc.start()
    yield proc
    proc.stop()


def wait_for(predicate, timeout: float, what: str) -> float:
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if predicate():
            return time.monotonic() - started
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def test_idle_close_reconnects_keeps_the_port_and_says_why(standin, data_server, caplog):
    caplog.set_level(logging.INFO, logger="dbtunneld")
    transport = SsmPortForwardTransport(aws, lambda: TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url)
    tunnel = Tunnel("idle", 0, "127.0.0.1", data_server.port, transport, SETTINGS, probe=lambda *a: ProbeResult(True, "data server"))
    tunnel.start()
    try:
        wait_for(lambda: tunnel.state == TunnelState.UP, 20, "the tunnel up")
        first = transport._session.session_id
        pooled = socket.create_connection(("127.0.0.1", tunnel.local_port), timeout=10)
        pooled.sendall(b"E\n")  # an echo connection, then idle, like a pooled MySQL connection
        pooled.sendall(b"hello")
        assert pooled.recv(5) == b"hello"
        idle_since = time.monotonic()
        pooled.settimeout(IDLE + 10)
        assert pooled.recv(10) == b""  # the pooled connection ends when the service closes the session
        closed_after = time.monotonic() - idle_since
        rebuilt = wait_for(lambda: transport._session is not None and transport._session.session_id != first and tunnel.state == TunnelState.UP, 10, "a new session")
        with socket.create_connection(("127.0.0.1", tunnel.local_port), timeout=10) as fresh:  # same stable port
            assert upload(fresh, 100_000, seed=3) == pattern_digest(100_000, seed=3)
        print(f"idle close after {closed_after:.1f} s of silence (timeout {IDLE:g} s); new session up {rebuilt:.2f} s later")
    finally:
        tunnel.stop()
    rows = {row["SessionId"]: row for row in standin.sessions()}
    assert "idle session timeout" in rows[first]["Reason"]
    assert IDLE <= closed_after < IDLE + 3
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"[ssm session={first}] client connection on smux stream" in text and "idle session timeout" in text
    assert "upstream lost (Session Manager ended SSM session" in text
