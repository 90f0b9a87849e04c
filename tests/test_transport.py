"""Transports: the ssh one against a real sshd; construction from config; the plugin's missing binary."""

from __future__ import annotations

import pytest

from dbtunneld.adapters import ssh, transport, transport_config
from dbtunneld.adapters.openssh_transport import OpenSshTransport
from dbtunneld.core.config import parse_config
from dbtunneld.core.errors import ClosedError, HostKeyError, NeedsUserError, TransientError
from tunnel_servers import GreetingEchoServer, Sshd, free_port, keygen


@pytest.fixture(scope="module")
def echo():
    server = GreetingEchoServer()
    yield server
    server.close()


@pytest.fixture
def sshd(tmp_path, echo):
    server = Sshd(tmp_path / "sshd", permit_open=[echo.port]).start()
    yield server
    server.stop()


def ssh_transport(sshd: Sshd, host_key: str | None = None) -> transport.SshTransport:
    def options_for(label):
        return ssh.SshOptions(user="root", host_label=label, key_file=str(sshd.client_key), use_agent=False,
                              host_key=host_key or sshd.host_key_line, timeout=5)
    return transport.SshTransport("127.0.0.1", sshd.port, options_for)


def greeting(chan) -> bytes:
    data = b""
    while len(data) < 5:
        data += chan.recv(5 - len(data))
    return data


def test_ssh_transport_lifecycle(sshd, echo):
    t = ssh_transport(sshd)
    assert not t.is_alive() and t.wait_closed(0)
    with pytest.raises(TransientError):
        t.open_channel("127.0.0.1", echo.port, 1)
    t.connect()
    assert t.is_alive() and t.ping(5)
    assert t.describe() == f"ssh via [127.0.0.1]:{sshd.port}"
    chan = t.open_channel("127.0.0.1", echo.port, 5)
    assert greeting(chan)[4] == 0x0A
    chan.close()
    t.close()
    t.close()
    assert not t.is_alive()


def test_ssh_transport_reconnects_after_the_bastion_restarts(sshd, echo):
    t = ssh_transport(sshd)
    t.connect()
    sshd.kill()
    assert t.wait_closed(10)
    with pytest.raises(TransientError):
        t.connect()                       # bastion down: transient, the tunnel retries
    sshd.start()
    t.connect()
    assert greeting(t.open_channel("127.0.0.1", echo.port, 5))[4] == 0x0A
    t.close()


def test_ssh_transport_refuses_a_changed_host_key(sshd, tmp_path):
    keygen(tmp_path / "other")
    pinned = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    t = ssh_transport(sshd, host_key=pinned)
    with pytest.raises(HostKeyError):
        t.connect()
    assert not t.is_alive()


# ---- construction from config ------------------------------------------------------------

CONFIG = """
[aws]
region = "eu-west-1"
endpoint_urls = {{ ssm = "http://127.0.0.1:1", ec2 = "http://127.0.0.1:1" }}
[vault]
address = "http://127.0.0.1:8200"
role = "dev"
[bastion]
transport = "{kind}"
{target}
host = "127.0.0.1"
user = "tunnel"
[[clusters]]
name = "orders"
endpoint = "orders.db.internal"
db_role = "orders-ro"
"""


def config(kind: str, target: str = 'instance_id = "i-0123456789abcdef0"'):
    return parse_config(CONFIG.format(kind=kind, target=target))


class NoAws:
    """A session factory that must not be called."""

    calls = 0

    def __call__(self):
        NoAws.calls += 1
        raise AssertionError("AWS was called")


@pytest.mark.parametrize("kind, client, cls", [
    ("ssh", "paramiko", transport.SshTransport),
    ("ssh", "openssh", OpenSshTransport),
    ("ssm-ssh", "", transport.SsmSshTransport),
    ("ssm-port-forward", "", transport.SsmPortForwardTransport),
    ("plugin", "", transport.PluginTransport),
])
def test_build_transport_picks_the_configured_kind(kind, client, cls):
    target = 'instance_id = "i-0123456789abcdef0"' + (f'\nclient = "{client}"' if client else "")
    cfg = config(kind, target)
    t = transport_config.build_transport(cfg, cfg.clusters[0], NoAws())
    assert type(t) is cls and t.kind == kind
    assert t.ssh_client == ("paramiko" if kind in ("ssm-ssh", "plugin") else client)


def test_cluster_override_wins():
    cfg = parse_config(CONFIG.format(kind="ssm-ssh", target='instance_id = "i-0123456789abcdef0"')
                       + 'transport = "ssm-port-forward"\n')
    t = transport_config.build_transport(cfg, cfg.clusters[0], NoAws())
    assert isinstance(t, transport.SsmPortForwardTransport)
    assert (t.host, t.port) == ("orders.db.internal", 3306)


def test_aws_transports_need_a_session():
    cfg = config("ssm-ssh")
    with pytest.raises(NeedsUserError):
        transport_config.build_transport(cfg, cfg.clusters[0], None)


def test_missing_plugin_is_a_clear_error_before_any_session(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    cfg = config("plugin")
    t = transport_config.build_transport(cfg, cfg.clusters[0], NoAws())
    before = NoAws.calls
    with pytest.raises(NeedsUserError) as info:
        t.connect()
    assert "session-manager-plugin" in str(info.value) and "install" in info.value.hint
    assert NoAws.calls == before          # no StartSession was made
    assert not t.is_alive()


def test_port_forward_streams_only_reach_the_sessions_endpoint():
    class Session:
        def __init__(self):
            self.closed = False

        def open_stream(self, timeout):
            return "stream"

        def is_alive(self):
            return not self.closed

        def wait_closed(self, timeout=None):
            return self.closed

        def close(self):
            self.closed = True

    t = transport.SsmPortForwardTransport(NoAws(), lambda: "i-0123456789abcdef0", "db", 3306)
    t._session = session = Session()
    stream = t.open_channel("db", 3306, 1)              # a writer endpoint: watched for read-only answers
    assert stream._stream == "stream"
    with pytest.raises(ClosedError):
        t.open_channel("other", 3306, 1)
    assert t.is_alive()
    t.close()
    assert session.closed and not t.is_alive() and t.wait_closed(0)


def test_tags_are_resolved_through_discovery_on_each_connect(monkeypatch):
    calls = []
    monkeypatch.setattr(transport_config, "find_bastion",
                        lambda ec2, tags: calls.append(tags) or type("B", (), {"instance_id": f"i-{len(calls):017x}"})())

    class Session:
        def client(self, name, **kw):
            assert name == "ec2" and kw["endpoint_url"] == "http://127.0.0.1:1"
            return object()

    cfg = config("ssm-ssh", target='tags = { Name = "bastion" }')
    resolve = transport_config._target_resolver(cfg.bastion, lambda: Session(), cfg.aws.region, cfg.aws.endpoint_urls["ec2"])
    assert resolve() == "i-00000000000000001" and resolve() == "i-00000000000000002"
    assert calls == [{"Name": "bastion"}] * 2


def test_ec2_instance_connect_pushes_a_fresh_key_before_each_login(sshd, echo, monkeypatch):
    """bastion.ec2_instance_connect: no key file, no agent; the instance side (the EIC agent's
    AuthorizedKeysCommand) is played by a fake client that adds the pushed key for sshd."""
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    sshd.authorized.write_text("")
    pushed = []

    class InstanceConnect:
        def send_ssh_public_key(self, **kw):
            pushed.append(kw)
            sshd.authorized.write_text(kw["SSHPublicKey"] + "\n")
            return {"Success": True}

    class Session:
        def client(self, name, **kw):
            assert name == "ec2-instance-connect"
            return InstanceConnect()

    cfg = parse_config(CONFIG.format(kind="ssh", target='instance_id = "i-0123456789abcdef0"')
                       .replace('host = "127.0.0.1"', f'host = "127.0.0.1"\nport = {sshd.port}\n'
                                f'host_key = "{sshd.host_key_line}"\nec2_instance_connect = true')
                       .replace('user = "tunnel"', 'user = "root"'))
    t = transport_config.build_transport(cfg, cfg.clusters[0], lambda: Session())
    try:
        t.connect()
        t.connect()                       # a reconnect pushes a new key
        assert greeting(t.open_channel("127.0.0.1", echo.port, 5))[4] == 0x0A
    finally:
        t.close()
        sshd.reset_authorized_keys()
    assert [p["InstanceId"] for p in pushed] == ["i-0123456789abcdef0"] * 2
    assert pushed[0]["InstanceOSUser"] == "root" and pushed[0]["SSHPublicKey"] != pushed[1]["SSHPublicKey"]
