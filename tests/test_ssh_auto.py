"""``[bastion] client = "auto"`` (the default for transport ``ssh`` where OpenSSH can run): the SSH
engine chosen at each connect by the round trip to the bastion (``dbtunneld/adapters/ssh_auto.py``).

The probe against a real sshd, direct and through a delay line that answers the TCP handshake
itself (``bench/delayproxy.py``: the handshake alone would call that bastion near); tunnels built
from the config on a near bastion (OpenSSH) and a far one (paramiko), bytes checked both ways with
the ``mariadb`` CLI on the near one; the engine following the link at a reconnect.
"""

from __future__ import annotations

import shutil
import subprocess
from typing import Any, Callable

import pytest

from bench.delayproxy import DelayProxy
from dbtunneld.adapters.ssh_auto import NEAR, AutoSshTransport, ssh_round_trip
from dbtunneld.adapters.transport import Transport
from dbtunneld.adapters.transport_config import build_transport
from dbtunneld.core.config import parse_config
from dbtunneld.core.model import TunnelState
from dbtunneld.sandbox.procs import free_port
from test_openssh_transport import bastion, pool, tunnels  # noqa: F401  (fixtures: a private sshd + echo server, tunnels)
from test_tunnel_stack import echo_round_trip, eventually
from tunnel_servers import Sshd

pytestmark = pytest.mark.skipif(not shutil.which("ssh"), reason="no OpenSSH client")

S = TunnelState
CONFIG = """
[vault]
address = "http://127.0.0.1:8200"
role = "dev"
[bastion]
transport = "ssh"
host = "127.0.0.1"
port = {port}
user = "{user}"
key_file = "{key}"
host_key = "{host_key}"
{extra}
[[clusters]]
name = "c"
endpoint = "127.0.0.1"
port = {remote}
db_role = "r"
"""


def config_for(stack: Any, sshd: Sshd, port: int, remote: int, extra: str = "") -> Any:
    return parse_config(CONFIG.format(port=port, user=stack.ssh_user, key=sshd.client_key, host_key=sshd.host_key_line,
                                      remote=remote, extra=extra))


def test_auto_is_the_default_where_openssh_can_run(stack, bastion, monkeypatch):
    sshd, echo = bastion
    for extra in ("", 'client = "auto"'):
        cfg = config_for(stack, sshd, sshd.port, echo.port, extra)
        assert cfg.bastion.client == "auto"
        assert isinstance(build_transport(cfg, cfg.clusters[0]), AutoSshTransport)
    eic = config_for(stack, sshd, sshd.port, echo.port, "ec2_instance_connect = true")
    assert eic.bastion.client == "paramiko"             # its key exists only in memory: not for ssh -M
    monkeypatch.setenv("PATH", "/nonexistent")
    assert config_for(stack, sshd, sshd.port, echo.port).bastion.client == "paramiko"


def test_round_trip_probe_sees_through_a_relay_that_answers_the_handshake(bastion):
    sshd, _ = bastion
    near = ssh_round_trip("127.0.0.1", sshd.port, 5)
    assert near is not None and near < NEAR
    with DelayProxy(sshd.port, delay=0.01) as relay:
        far = ssh_round_trip("127.0.0.1", relay.port, 5)
    assert far is not None and far >= 0.018               # 2 x 10 ms, though the handshake took ~0
    assert ssh_round_trip("127.0.0.1", free_port(), 1) is None


@pytest.mark.parametrize("delay, engine", [(0.0, "openssh"), (0.01, "paramiko")])
def test_near_bastion_runs_openssh_far_one_paramiko_bytes_exact(stack, bastion, tunnels, delay, engine):
    sshd, echo = bastion
    relay = DelayProxy(sshd.port, delay=delay) if delay else None
    try:
        cfg = config_for(stack, sshd, relay.port if relay else sshd.port, echo.port)
        t = tunnels(build_transport(cfg, cfg.clusters[0]), ("127.0.0.1", echo.port))
        eventually(lambda: t.state == S.UP, what="up")
        assert t.status().ssh_client == engine and t.transport.adopts_clients == (engine == "openssh")
        sent, got = echo_round_trip(t.local_port, 1_000_000, seed=7)
        assert sent == got
    finally:
        if relay:
            relay.close()


def test_mariadb_cli_through_the_default_engine(stack, bastion, tunnels):
    sshd, _ = bastion
    orders = stack.clusters["orders"]
    cfg = config_for(stack, sshd, sshd.port, orders.port)
    t = tunnels(build_transport(cfg, cfg.clusters[0]), ("127.0.0.1", orders.port))
    eventually(lambda: t.state == S.UP, what="up")
    out = subprocess.run(["mariadb", "-h", "127.0.0.1", "-P", str(t.local_port), "-u", orders.admin_user,
                          f"--password={orders.admin_password}", "--skip-ssl", "-N", "-e", "SELECT 40 + 2"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and out.stdout.strip() == "42", out.stderr
    assert t.status().ssh_client == "openssh"


class FakeEngine(Transport):
    """An engine that records what the auto transport asks of it."""

    kind = "ssh"

    def __init__(self, name: str, adopts: bool) -> None:
        self.ssh_client, self.adopts_clients = name, adopts
        self.connects = self.closes = 0
        self.up = False

    def connect(self) -> None:
        self.connects += 1
        self.up = True

    def open_channel(self, host: str, port: int, timeout: float) -> Any:
        return (self.ssh_client, host, port)

    def is_alive(self) -> bool:
        return self.up

    def close(self) -> None:
        self.closes += 1
        self.up = False


def test_the_engine_follows_the_link_at_each_reconnect():
    trips: list[float | None] = [0.0004, 0.0004, 0.030, None, 0.001]
    openssh, paramiko = FakeEngine("openssh", True), FakeEngine("paramiko", False)
    made: dict[str, int] = {"openssh": 0, "paramiko": 0}

    def maker(engine: FakeEngine) -> Callable[[], Transport]:
        def make() -> Transport:
            made[engine.ssh_client] += 1
            return engine
        return make

    auto = AutoSshTransport("bastion", 22, maker(openssh), maker(paramiko), probe=lambda h, p, t: trips.pop(0))
    assert auto.ssh_client == "auto" and not auto.adopts_clients and not auto.is_alive()
    chosen = []
    for _ in range(5):
        auto.connect()
        chosen.append((auto.ssh_client, auto.adopts_clients, auto.open_channel("db", 3306, 1)[0]))
    assert [c[0] for c in chosen] == ["openssh", "openssh", "paramiko", "openssh", "openssh"]
    assert all(c[0] == c[2] and c[1] == (c[0] == "openssh") for c in chosen)
    assert made == {"openssh": 1, "paramiko": 1}               # each engine made once, reused
    assert paramiko.closes == 1 and openssh.closes == 1         # the one left behind is closed at a switch
    auto.close()
    assert not auto.is_alive() and not openssh.up and not paramiko.up
