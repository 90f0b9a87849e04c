"""The native SSM client end to end, against the SSM stand-in running as its own process.

Real parts: the stand-in (a subprocess, stopped by pid), OpenSSH sshd and MariaDB from the
sandbox stack, and a threaded TCP data server for byte-exact transfers. The stand-in runs in
``realistic`` mode (the agent's 1 KiB reads with 1 ms sleeps, oldest-only resends every 100 ms:
~1 MB/s) except where a test measures the client's own throughput under loss: those switch it
to ``fast`` mode and 16 KiB messages both ways, and say so.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import boto3
import paramiko
import pymysql
import pytest

from dbtunneld.adapters.ssm import ChannelOptions, api, start_port_forward, start_ssh_session
from dbtunneld.core.errors import ClosedError, NeedsUserError, TransientError
from dbtunneld.adapters.ssm.session import SsmSession
from dbtunneld.sandbox.ssm_standin import SsmStandIn
from dbtunneld.sandbox.ssm_testkit import DataServer, StandInProcess, download, pattern, pattern_digest, upload
from tunnel_servers import GreetingEchoServer, mysql_greeting

TARGET = "i-0123456789abcdef0"
ECS_TARGET = "ecs:orders_0123456789abcdef0123456789abcdef_0123456789abcdef0123456789abcdef-1234567890"
BULK = ChannelOptions(max_payload=16384)
MB = 1_000_000
CREDENTIALS = {"AKIDSSMSESSIONTEST": "secret-ssm-session-test"}


def aws() -> boto3.Session:
    return boto3.Session(aws_access_key_id="AKIDSSMSESSIONTEST", aws_secret_access_key="secret-ssm-session-test", aws_session_token="session-token-ssm-session-test", region_name="us-east-1")


@pytest.fixture(scope="module")
def data_server():
    server = DataServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def standin(data_server, tmp_path_factory):
    log_path = tmp_path_factory.mktemp("ssm") / "standin.log"
    proc = StandInProcess("--target", f"{TARGET}=127.0.0.1:{data_server.port}", "--target", f"{ECS_TARGET}=127.0.0.1:{data_server.port}", "--allow-remote", "127.0.0.1", log_path=str(log_path), credentials=CREDENTIALS)
    proc.start()
    yield proc
    proc.stop()


@pytest.fixture
def faults(standin):
    """Set stand-in faults for one test; always reset afterwards."""

    def set_faults(**values):
        return standin.control("/_standin/faults", values)

    yield set_faults
    standin.control("/_standin/faults", {"drop": 0, "delay_ms": 0, "jitter_ms": 0, "close_after_messages": 0, "agent_payload": 1024, "mode": "realistic", "idle_timeout": 1200, "max_session_duration": 0})


# --- SSH over SSM to the real sshd, then MariaDB through it ---------------------------------------


def test_ssh_over_ssm_to_real_sshd_then_a_mariadb_query(stack, tmp_path):
    cluster = stack.clusters["orders"]
    with StandInProcess("--target", f"{TARGET}=127.0.0.1:{stack.ssh_port}", log_path=str(tmp_path / "standin.log"), credentials=CREDENTIALS) as proc:
        session = start_ssh_session(aws(), TARGET, port=22, endpoint_url=proc.url)
        transport = paramiko.Transport(session.sock)
        try:
            transport.start_client(timeout=15)
            server_key = transport.get_remote_server_key()
            assert f"{server_key.get_name()} {server_key.get_base64()}" == stack.host_key
            transport.auth_publickey(stack.ssh_user, paramiko.Ed25519Key.from_private_key_file(stack.ssh_key_file))
            channel = transport.open_channel("direct-tcpip", ("127.0.0.1", cluster.port), ("127.0.0.1", 0), timeout=10)
            conn = pymysql.connect(user=cluster.admin_user, password=cluster.admin_password, database=cluster.database, defer_connect=True)
            conn.connect(channel)
            with conn.cursor() as cur:
                cur.execute(f"SELECT COUNT(*) FROM {cluster.table}")
                (count,) = cur.fetchone()
                cur.execute("SELECT @@port")
                assert cur.fetchone()[0] == cluster.port
            assert count > 0
            conn.close()
        finally:
            transport.close()
            session.close()
        row = proc.session(session.session_id)
        assert row["Status"] == "Terminated" and row["Target"] == TARGET and row["DocumentName"] == api.DOC_SSH


# --- port forwarding -------------------------------------------------------------------------------


def test_fifty_concurrent_port_forward_connections_are_byte_exact(standin, data_server):
    with start_port_forward(aws(), ECS_TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url) as session:

        def one(i: int) -> tuple[bool, bool]:
            with session.open_stream(timeout=10) as down_sock:
                digest, got = download(down_sock, 100_000 + i * 997, seed=i)
            with session.open_stream(timeout=10) as up_sock:
                echoed = upload(up_sock, 50_000 + i * 101, seed=i)
            return digest == pattern_digest(100_000 + i * 997, seed=i), echoed == pattern_digest(50_000 + i * 101, seed=i)

        with ThreadPoolExecutor(max_workers=50) as pool:
            results = list(pool.map(one, range(50)))
        assert results == [(True, True)] * 50
        assert session.is_alive()
    assert standin.session(session.session_id)["Status"] == "Terminated"


def test_echo_round_trips_keep_their_order(standin, data_server):
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url) as session:
        with session.open_stream() as sock:
            sock.sendall(b"E\n")
            for i in range(200):
                message = f"ping {i:04d} ".encode() * (1 + i % 7)
                sock.sendall(message)
                got = b""
                while len(got) < len(message):
                    got += sock.recv(65536)
                assert got == message


def test_realistic_mode_paces_and_resends_like_the_agent(standin, data_server, faults):
    """The stand-in's default: 1 KiB per message with a 1 ms sleep (~1 MB/s at best), and only
    the oldest unacknowledged message resent, once per 100 ms. Fast mode is far quicker."""
    faults(drop=0.05, seed=17)
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url) as session:
        with session.open_stream() as sock:
            started = time.monotonic()
            digest, got = download(sock, MB // 2, seed=16)
            realistic = time.monotonic() - started
        assert got == MB // 2 and digest == pattern_digest(MB // 2, seed=16)
    stats = standin.session(session.session_id)["Stats"]
    assert realistic >= 0.5  # >= 500 messages of 1 KiB, each followed by a 1 ms sleep
    assert stats["dropped"] > 10 and stats["resent"] <= realistic * 10 + 3  # oldest only, every 100 ms
    faults(drop=0, mode="fast", agent_payload=16384)
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url, options=BULK) as session:
        with session.open_stream() as sock:
            started = time.monotonic()
            assert download(sock, MB // 2, seed=16)[1] == MB // 2
            fast = time.monotonic() - started
    print(f"0.5 MB at 5 % loss: realistic {realistic:.2f} s ({stats['resent']} agent resends); fast, no loss: {fast:.2f} s")
    assert fast < realistic / 3


@pytest.mark.fault
def test_five_percent_of_messages_dropped_fifty_megabytes_arrive_byte_exact(standin, data_server, faults):
    faults(drop=0.05, agent_payload=16384, seed=5, mode="fast")  # the client's loss repair at speed: fast mode
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url, options=BULK) as session:
        with session.open_stream() as sock:
            digest, got = download(sock, 50 * MB, seed=3)
        assert got == 50 * MB and digest == pattern_digest(50 * MB, seed=3)
        with session.open_stream() as sock:
            assert upload(sock, 10 * MB, seed=4) == pattern_digest(10 * MB, seed=4)
        client = session.stats
    stats = standin.session(session.session_id)["Stats"]
    assert stats["dropped"] > 150  # the fault really fired (~7,000 messages each way at 16 KiB)
    assert stats["resent"] > 0 and client["resent"] > 0
    assert client["resent"] < 0.25 * client["sent"]  # repairs, not a storm


@pytest.mark.fault
def test_websocket_closed_mid_download_resumes_without_loss_or_duplication(standin, data_server, faults):
    faults(close_after_messages=1000)  # realistic mode: the stand-in drops the websocket ~1 MB in
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url) as session:
        with session.open_stream() as sock:
            digest, got = download(sock, 3 * MB, seed=11)
        assert got == 3 * MB and digest == pattern_digest(3 * MB, seed=11)
        assert session.stats["resumes"] >= 1
    assert standin.session(session.session_id)["Connections"] >= 2


@pytest.mark.fault
def test_websocket_aborted_mid_upload_resumes_without_loss_or_duplication(standin, data_server):
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url, options=BULK) as session:
        payload = pattern(20 * MB, seed=12)
        with session.open_stream() as sock:
            sock.sendall(f"U {len(payload)}\n".encode())
            sent = threading.Event()

            def send() -> None:
                sock.sendall(payload)
                sent.set()

            writer = threading.Thread(target=send)
            writer.start()
            while session.stats.get("sent", 0) < 600:  # well into the transfer
                writer.join(0.01)
            standin.control(f"/_standin/sessions/{session.session_id}/close-websocket", {"mode": "abort"})
            writer.join(60)
            assert sent.is_set()
            answer = sock.recv(100).strip().decode()
        assert answer == hashlib.sha256(payload).hexdigest()
        assert session.stats["resumes"] >= 1 and session.is_alive()


@pytest.mark.fault
def test_delayed_and_reordered_messages_are_delivered_in_order(standin, data_server, faults):
    faults(delay_ms=2, jitter_ms=8, drop=0.02, seed=9)  # jitter reorders messages towards the client
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url) as session:
        with session.open_stream() as sock:
            digest, got = download(sock, 2 * MB, seed=13)
        assert got == 2 * MB and digest == pattern_digest(2 * MB, seed=13)
        assert session.stats["buffered"] > 100  # early arrivals were held for the gaps


def test_a_lone_pause_publication_does_not_hang_the_session(standin, data_server):
    """The service may send pause_publication and never start_publication. Like the agent, the
    client treats a pause as soft (lifted by the next acknowledgement or stream message) and
    caps it (ChannelOptions.pause_cap); before, an idle client paused this way hung for good."""
    options = ChannelOptions(pause_cap=1.0)
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url, options=options) as session:
        standin.control(f"/_standin/sessions/{session.session_id}/pause", {"start": False})
        time.sleep(0.3)  # the pause has arrived; nothing is in flight to lift it
        started = time.monotonic()
        result: list[str] = []
        worker = threading.Thread(target=lambda: result.append(upload(session.open_stream(timeout=10), 200_000, seed=22)), daemon=True)
        worker.start()
        worker.join(15)
        assert result == [pattern_digest(200_000, seed=22)], "the session hung on a lone pause_publication"
        assert time.monotonic() - started < 1.0 + 5.0  # the cap, plus a realistic-mode transfer
        assert session.is_alive()


def test_the_give_up_clock_keeps_running_while_paused(standin, data_server):
    """Paused by the service and then nothing at all: the client's give-up clock is not stopped
    by the pause (before, it was checked only while not paused: a paused dead session lived on)."""
    options = ChannelOptions(pause_cap=60.0, give_up_after=1.0, stall_after=60.0)
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url, options=options) as session:
        sock = session.open_stream()
        sock.sendall(b"E\n")
        time.sleep(0.3)
        standin.control(f"/_standin/sessions/{session.session_id}/freeze", {"frozen": True})
        sock.sendall(b"lost in the void")  # it waits for an acknowledgement that never comes
        time.sleep(0.2)
        standin.control(f"/_standin/sessions/{session.session_id}/pause", {"start": False})  # still delivered
        assert session.wait_closed(6), "a paused session that heard nothing more never gave up"
        assert isinstance(session.last_error, TransientError) and "acknowledged nothing" in session.last_error.message
        sock.close()


def test_pause_publication_holds_then_resumes_the_flow(standin, data_server):
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url) as session:
        with session.open_stream() as sock:
            standin.control(f"/_standin/sessions/{session.session_id}/pause", {"seconds": 0.3})
            assert upload(sock, MB // 2, seed=21) == pattern_digest(MB // 2, seed=21)


# --- ending sessions -------------------------------------------------------------------------------


def test_a_black_holed_session_is_declared_stalled_and_ends(standin, data_server):
    """The websocket stays open but nothing comes back (no acknowledgements): once data has
    waited ``stall_after`` s the channel ends with a TransientError, so its owner (the tunnel,
    watching ``wait_closed``) starts a new session. Before, it looked alive for 300 s."""
    options = ChannelOptions(stall_after=1.0)
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url, options=options) as session:
        with session.open_stream() as sock:
            sock.sendall(b"E\n")
            standin.control(f"/_standin/sessions/{session.session_id}/freeze", {"frozen": True})
            sock.sendall(b"anyone there?")
            assert session.wait_closed(6), "a black-holed session still looked alive"
        assert isinstance(session.last_error, TransientError) and "stalled" in session.last_error.message
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url) as fresh:
        with fresh.open_stream() as sock:
            assert upload(sock, 10_000) == pattern_digest(10_000)


def test_a_slow_local_reader_is_not_mistaken_for_a_stall(standin, data_server, faults):
    """While our own reader is back-pressured (the client reads slowly), acknowledgements cannot
    be read: that time does not count towards the stall. Fast mode: every buffer on the echo
    path must fill (~10 MB) before the agent's acknowledgements back up behind our reader."""
    faults(mode="fast", agent_payload=16384)
    options = ChannelOptions(stall_after=2.0, max_payload=16384)
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url, options=options) as session:
        with session.open_stream() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(b"E\n")
            writer = threading.Thread(target=sock.sendall, args=(pattern(24 * MB, seed=31),), daemon=True)
            writer.start()
            time.sleep(3.0)  # nobody reads the echo: the agent's output backs up to our reader
            digest, got = hashlib.sha256(), 0
            while got < 24 * MB:
                chunk = sock.recv(1 << 20)
                assert chunk, f"the session ended under a slow reader: {session.last_error}"
                digest.update(chunk)
                got += len(chunk)
            writer.join(10)
            assert digest.hexdigest() == pattern_digest(24 * MB, seed=31)
        assert session.is_alive(), session.last_error


def test_close_leaves_the_session_terminated_in_the_service(standin, data_server):
    session = start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url)
    assert standin.session(session.session_id)["Status"] == "Connected"
    session.close()
    session.close()  # idempotent
    row = standin.session(session.session_id)
    assert row["Status"] == "Terminated" and row["Reason"] == "the client ended the session"
    assert row["ClientVersion"] == "1.2.650.0"  # above 1.2.331.0: no smux keepalive, idle sessions kept
    assert session.closed.is_set() and not session.is_alive()
    with pytest.raises(ClosedError):
        session.open_stream()
    history = api.SsmApi(aws(), endpoint_url=standin.url).client.describe_sessions(State="History", Filters=[{"key": "SessionId", "value": session.session_id}])
    assert history["Sessions"][0]["Status"] == "Terminated"


def test_service_side_terminate_ends_the_session_with_a_reason(standin, data_server):
    session = start_ssh_session(aws(), TARGET, endpoint_url=standin.url)
    try:
        standin.control(f"/_standin/sessions/{session.session_id}/terminate", {"reason": "maintenance window"})
        assert session.wait_closed(10)
        assert isinstance(session.last_error, ClosedError) and "maintenance window" in session.last_error.message
        session.sock.settimeout(5)
        assert session.sock.recv(10) == b""  # the SSH side sees EOF
    finally:
        session.close()
    assert standin.session(session.session_id)["Status"] == "Terminated"


def test_output_that_comes_before_the_session_attaches_is_delivered(monkeypatch, tmp_path):
    """The destination speaks first (sshd's banner, MySQL's greeting): the agent sends it as soon
    as it has dialled, right behind HandshakeComplete, and the channel's reader may take it
    before the session has set its sink (a loaded machine: here the attach waits 0.5 s). It used
    to be acknowledged and dropped: paramiko then waited for a banner that never came ("Error
    reading SSH protocol banner", ssm-ssh tunnels in backoff now and then)."""
    speaker = GreetingEchoServer()
    original = SsmSession._attach

    async def late_attach(self, handshake):
        await asyncio.sleep(0.5)
        await original(self, handshake)

    monkeypatch.setattr(SsmSession, "_attach", late_attach)
    try:
        with StandInProcess("--target", f"{TARGET}=127.0.0.1:{speaker.port}", log_path=str(tmp_path / "standin.log"),
                            credentials=CREDENTIALS) as proc:
            with start_ssh_session(aws(), TARGET, endpoint_url=proc.url) as session:
                session.sock.settimeout(10)
                greeting = mysql_greeting()
                got = b""
                while len(got) < len(greeting):
                    chunk = session.sock.recv(4096)
                    assert chunk, f"closed after {got!r}"
                    got += chunk
                assert got == greeting
    finally:
        speaker.close()


def test_local_socket_closed_ends_the_ssh_session(standin):
    session = start_ssh_session(aws(), TARGET, endpoint_url=standin.url)
    session.sock.close()  # what paramiko does when the transport closes
    assert session.wait_closed(10)
    session.close()
    assert standin.session(session.session_id)["Status"] == "Terminated"


def test_tokens_and_stream_url_secrets_never_reach_the_logs(standin, data_server, caplog, monkeypatch):
    grants: list[api.Grant] = []
    original = api.SsmApi.start_session

    def recording(self, *args, **kwargs):
        grant = original(self, *args, **kwargs)
        grants.append(grant)
        return grant

    monkeypatch.setattr(api.SsmApi, "start_session", recording)
    caplog.set_level(logging.DEBUG, logger="dbtunneld")
    caplog.set_level(logging.DEBUG, logger="websockets")
    with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url) as session:
        standin.control(f"/_standin/sessions/{session.session_id}/close-websocket", {"mode": "close"})
        with session.open_stream() as sock:
            assert upload(sock, 100_000) == pattern_digest(100_000)
        assert session.stats["resumes"] >= 1
    text = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("dbtunneld", "websockets")))
    assert session.session_id in text and "resuming" in text  # the logs do talk about the session...
    grant = grants[0]
    secret_query = grant.stream_url.split("?", 1)[1]
    for secret in (grant.token, secret_query, "secret-ssm-session-test", "session-token-ssm-session-test"):
        assert secret not in text


def test_agents_too_old_to_multiplex_are_reported_with_a_fix(data_server):
    old_agent = SsmStandIn(targets={TARGET: ("127.0.0.1", data_server.port)}, allow_remote=["127.0.0.1"], agent_version="3.0.161.0", credentials=CREDENTIALS).start_background()
    try:
        with pytest.raises(NeedsUserError, match="cannot multiplex") as info:
            start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=old_agent.url)
        assert "update the SSM agent" in info.value.hint
        (record,) = old_agent.sessions.values()
        assert record.status == "Terminated"  # the failed start still ended the session
    finally:
        old_agent.stop_background()
