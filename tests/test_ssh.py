"""The paramiko adapter against a real OpenSSH sshd on a free loopback port."""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time

import paramiko
import pytest

from dbtunneld.adapters import ssh, ssh_auth, ssh_hostkeys
from dbtunneld.core.errors import HostKeyError, NeedsUserError, PermissionDeniedError, TransientError
from tunnel_servers import GreetingEchoServer, Sshd, free_port, keygen


@pytest.fixture(scope="module")
def echo():
    server = GreetingEchoServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory, echo):
    server = Sshd(tmp_path_factory.mktemp("sshd"), permit_open=[echo.port]).start()
    yield server
    server.stop()


def options(sshd: Sshd, **kw) -> ssh.SshOptions:
    base = dict(user="root", host_label=ssh.known_hosts_name("127.0.0.1", sshd.port),
                key_file=str(sshd.client_key), use_agent=False, host_key=sshd.host_key_line, timeout=5)
    base.update(kw)
    return ssh.SshOptions(**base)


def dial(sshd: Sshd, **kw) -> ssh.SshConnection:
    return ssh.connect(ssh.tcp_connect("127.0.0.1", sshd.port), options(sshd, **kw))


def read_exact(chan, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = chan.recv(n - len(buf))
        if not chunk:
            break
        buf += chunk
    return buf


def test_channel_carries_bytes_with_tuned_transport(sshd, echo):
    with dial(sshd) as conn:
        chan = conn.open_channel("127.0.0.1", echo.port, timeout=5)
        assert read_exact(chan, 4)[3] == 0 and chan.recv(1) == b"\x0a"
        chan.recv(65536)
        payload = os.urandom(1 << 20)
        threading.Thread(target=chan.sendall, args=(payload,), daemon=True).start()
        assert read_exact(chan, len(payload)) == payload
        chan.close()
        assert conn._transport.remote_cipher == "aes128-gcm@openssh.com"
        assert conn._transport.default_window_size == ssh.WINDOW_SIZE


def test_each_channel_open_is_answered_at_once_so_the_greeting_is_not_held(sshd, echo, monkeypatch):
    """sshd keeps Nagle on for a forwarding-only connection (``ssh_packet_set_interactive`` is
    called from session.c for sessions only), so the server's greeting, sent right behind the open
    confirmation, waits for our ACK of that confirmation, which the kernel delays (40 ms here, up
    to 100 ms on macOS): one SSH_MSG_IGNORE right after each open carries the ACK at once
    (``bench.greeting_first_byte`` measures it: 44 ms -> 1 ms to the greeting)."""
    sent: list[bool] = []
    real = paramiko.Transport.send_ignore

    def recording(self, byte_count=None):
        sent.append(all(chan.active for chan in self._channels.values()))   # after the confirmation
        return real(self, byte_count)

    monkeypatch.setattr(paramiko.Transport, "send_ignore", recording)
    with dial(sshd) as conn:
        for n in range(1, 4):
            chan = conn.open_channel("127.0.0.1", echo.port, timeout=5)
            assert read_exact(chan, 4)[3] == 0 and chan.recv(1) == b"\x0a"
            assert sent == [True] * n
            chan.close()


def test_tcp_socket_has_nodelay(sshd):
    sock = ssh.tcp_connect("127.0.0.1", sshd.port)
    try:
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
    finally:
        sock.close()


def test_known_hosts_file_is_accepted(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line())
    with dial(sshd, host_key="", known_hosts=str(kh)) as conn:
        assert conn.is_alive()


def test_hashed_known_hosts_entry_is_accepted(sshd, tmp_path):
    kh = tmp_path / "known_hosts"
    kh.write_text(sshd.known_hosts_line())
    subprocess.run(["ssh-keygen", "-H", "-f", str(kh)], check=True, capture_output=True)
    assert "127.0.0.1" not in kh.read_text()
    with dial(sshd, host_key="", known_hosts=str(kh)) as conn:
        assert conn.is_alive()


def test_pinned_key_mismatch_is_refused_with_hint(sshd, tmp_path):
    other = keygen(tmp_path / "other")
    pinned = " ".join((tmp_path / "other.pub").read_text().split()[:2])
    with pytest.raises(HostKeyError) as info:
        dial(sshd, host_key=pinned)
    assert "does not match" in str(info.value)
    assert "bastion.host_key" in info.value.hint
    assert other.exists()


def test_known_hosts_mismatch_is_refused(sshd, tmp_path):
    keygen(tmp_path / "other")
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} " + (tmp_path / "other.pub").read_text())
    with pytest.raises(HostKeyError) as info:
        dial(sshd, host_key="", known_hosts=str(kh))
    assert "does not match" in str(info.value) and str(kh) in str(info.value)


def test_unknown_host_is_never_auto_accepted(sshd, tmp_path):
    with pytest.raises(HostKeyError) as info:
        dial(sshd, host_key="", known_hosts=str(tmp_path / "empty"))
    assert "not known" in str(info.value)
    assert sshd.host_key_line.split()[1] in info.value.hint   # the line to pin, after verifying


def test_garbage_pinned_key_is_a_host_key_error(sshd):
    with pytest.raises(HostKeyError):
        dial(sshd, host_key="ssh-ed25519 bm90LWEta2V5")


def test_wrong_client_key_is_permission_denied(sshd, tmp_path):
    stranger = keygen(tmp_path / "stranger")
    with pytest.raises(PermissionDeniedError) as info:
        dial(sshd, key_file=str(stranger))
    assert "root" in str(info.value) and "ssh-add" in info.value.hint


def test_passphrase_key_asks_for_the_agent(sshd, tmp_path):
    key = tmp_path / "locked"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "pass-phrase", "-f", str(key)], check=True)
    with pytest.raises(NeedsUserError) as info:
        dial(sshd, key_file=str(key))
    assert "ssh-add" in info.value.hint


def test_nothing_listening_is_transient():
    with pytest.raises(TransientError):
        ssh.tcp_connect("127.0.0.1", free_port(), timeout=2)


def test_forwarding_outside_permit_open_is_refused(sshd):
    with dial(sshd) as conn:
        with pytest.raises(ssh.ForwardingRefusedError) as info:
            conn.open_channel("127.0.0.1", free_port(), timeout=5)
        assert "PermitOpen" in info.value.hint
        assert conn.is_alive()


@pytest.fixture
def agent(sshd, tmp_path, monkeypatch):
    sock = tmp_path / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdout=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.02)
        monkeypatch.setenv("SSH_AUTH_SOCK", str(sock))
        subprocess.run(["ssh-add", "-q", str(sshd.client_key)], check=True, env=dict(os.environ),
                       capture_output=True)
        yield proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_agent_key_authenticates(sshd, agent):
    with dial(sshd, key_file="", use_agent=True) as conn:
        assert conn.is_alive()


def test_ephemeral_key_through_ec2_instance_connect(sshd, monkeypatch):
    """moto answers SendSSHPublicKey; the instance side (the EIC agent) is played by the test."""
    moto = pytest.importorskip("moto")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    import boto3

    with moto.mock_aws():
        real = boto3.client("ec2-instance-connect", region_name="us-east-1")

        class InstanceSide:
            def send_ssh_public_key(self, **kw):
                answer = real.send_ssh_public_key(**kw)
                with open(sshd.authorized, "a") as f:
                    f.write(kw["SSHPublicKey"] + "\n")
                self.sent = kw
                return answer

        eic = InstanceSide()
        key = ssh_auth.send_ephemeral_key(eic, "i-0123456789abcdef0", "root", classify=lambda e, d: e)
    try:
        assert eic.sent["InstanceOSUser"] == "root" and eic.sent["SSHPublicKey"].startswith("ssh-ed25519 ")
        with dial(sshd, key_file="", pkey=key) as conn:
            assert conn.is_alive()
    finally:
        sshd.reset_authorized_keys()


def test_ephemeral_key_failure_is_classified():
    class Refusing:
        def send_ssh_public_key(self, **kw):
            raise RuntimeError("AccessDenied")

    err = PermissionDeniedError("no")
    with pytest.raises(PermissionDeniedError):
        ssh_auth.send_ephemeral_key(Refusing(), "i-0123456789abcdef0", "root", classify=lambda e, d: err)


@pytest.fixture
def own_sshd(tmp_path, echo):
    server = Sshd(tmp_path / "own", permit_open=[echo.port]).start()
    yield server
    server.stop()


def test_ping_answers_then_notices_a_frozen_server(own_sshd):
    with dial(own_sshd) as conn:
        assert conn.ping(timeout=5)
        own_sshd.freeze()
        try:
            assert not conn.ping(timeout=1)
        finally:
            own_sshd.thaw()
        assert conn.ping(timeout=5)


def test_wait_closed_returns_when_the_bastion_dies(own_sshd):
    conn = dial(own_sshd)
    assert not conn.wait_closed(timeout=0.05)
    own_sshd.kill()
    assert conn.wait_closed(timeout=10)
    assert not conn.is_alive() and not conn.ping(timeout=1)
    with pytest.raises(TransientError):
        conn.open_channel("127.0.0.1", 1, timeout=1)
    conn.close()
    conn.close()   # idempotent


def test_connects_over_any_socket_like(sshd):
    """The SSM face hands paramiko one end of a socket pair; a relay plays the SSM session."""
    ours, theirs = socket.socketpair()
    upstream = socket.create_connection(("127.0.0.1", sshd.port))

    def relay(src, dst):
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    for a, b in ((theirs, upstream), (upstream, theirs)):
        threading.Thread(target=relay, args=(a, b), daemon=True).start()
    conn = ssh.connect(ours, options(sshd))
    try:
        assert conn.ping(timeout=5)
    finally:
        conn.close()
        upstream.close()
        theirs.close()


def test_parse_public_key_rejects_a_short_line():
    with pytest.raises(HostKeyError):
        ssh_hostkeys.parse_public_key("ssh-ed25519")


def test_ephemeral_keys_are_fresh():
    a, b = ssh_auth.ephemeral_key(), ssh_auth.ephemeral_key()
    assert isinstance(a, paramiko.Ed25519Key) and a.get_base64() != b.get_base64()
