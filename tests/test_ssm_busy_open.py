"""A client arriving while downloads fill an ssm-ssh link (real sshd, the SSM stand-in in
realistic mode, the tunnel as the daemon builds it from a config).

The SSM data channel is one ordered stream: the agent sends each message at the end of its
outgoing buffer (amazon-ssm-agent ``agent/session/datachannel/datachannel.go``
``SendStreamDataMessage``; the stand-in's ``ssm_agent`` follows it, reading 1 KiB at a time in
realistic mode as the agent's port plugin does), so the SSH channel-open confirmation for a new
client is queued behind every download byte sshd has already written. The tunnel used to give
such an open up after ``health_timeout`` and retry it behind ever more bytes, and refused the
client at ``connect_wait``; now the open waits for the rest of ``connect_wait`` while the check
that starts after ``health_timeout`` finds the busy upstream alive. And what is queued in front of
it is bounded: over SSM the SSH channel window is 1 MiB (``transport.SSM_CHANNEL_WINDOW``), not the
16 MiB of a direct bastion, so sshd can have only that much per channel in the agent's queue.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest

from dbtunneld.core.config import TunnelSettings
from dbtunneld.core.model import TunnelState
from dbtunneld.sandbox.ssm_testkit import DataServer, StandInProcess
from test_tunnel_stack import NOT_MYSQL, Env, download, env, eventually, tunnels  # noqa: F401 (fixtures)

MB = 1 << 20
SETTINGS = TunnelSettings(connect_wait=15, health_interval=30, health_timeout=1, keepalive_interval=2,
                          backoff_initial=0.2, backoff_max=2)


@pytest.fixture
def realistic_ssm(env):
    before = env.ssm.control("/_standin/faults")
    env.ssm.control("/_standin/faults", {"mode": "realistic", "agent_payload": 1024})
    yield
    env.ssm.control("/_standin/faults", {"mode": before["mode"], "agent_payload": before["agent_payload"]})


def first_bytes_after(port: int, size: int) -> float:
    """Seconds from connecting until the first of ``size`` data-server bytes arrive."""
    started = time.monotonic()
    sock = socket.create_connection(("127.0.0.1", port), timeout=60)
    try:
        sock.sendall(f"D {size} 7\n".encode())
        first = sock.recv(65536)
        assert first, "closed without data"
        assert not first.startswith(b"\xff"), f"refused: {first[4:].decode(errors='replace')}"
        return time.monotonic() - started
    finally:
        sock.close()


@pytest.mark.fault
def test_a_client_arriving_behind_downloads_on_ssm_ssh_gets_its_channel(env: Env, tunnels, realistic_ssm):
    t = tunnels(env.transport("ssm-ssh", "127.0.0.1", env.data.port), ("127.0.0.1", env.data.port),
                settings=SETTINGS, **NOT_MYSQL)
    eventually(lambda: t.state == TunnelState.UP, what="up")
    done: list[str] = []
    loads = [threading.Thread(target=lambda i=i: done.append(download(t.local_port, 12 * MB, seed=i)), daemon=True)
             for i in range(2)]
    for th in loads:
        th.start()
    time.sleep(3.0)                                   # sshd has filled the link's queues by now
    waited = first_bytes_after(t.local_port, 1000)
    assert waited > SETTINGS.health_timeout, f"{waited:.1f} s: the link was not busy; the test shows nothing"
    # ahead of it: at most a window per download (1 MiB: ~1 s each at the agent's pace), both ways;
    # with 16 MiB windows it was ~16 s (all that sshd had sent), with opens given up a refusal
    assert waited < 10.0, f"the late client waited {waited:.1f} s behind the downloads"
    assert t.status().reconnects == 0 and t.state == TunnelState.UP
    for th in loads:
        th.join(120)
    assert len(done) == 2
    print(f"late client's first byte after {waited:.1f} s behind 2 x 12 MB downloads")
