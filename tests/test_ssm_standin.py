"""The SSM stand-in's own rules (dbtunneld.sandbox.ssm_standin): what it checks and answers.

The data-channel behaviour end to end is in test_ssm_session.py; here the API and websocket
gatekeeping, the session table and the control API, against an in-process stand-in.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import urllib.error
import urllib.request

import boto3
import pytest

from dbtunneld.adapters.ssm import api
from dbtunneld.adapters.ssm import message as m
from dbtunneld.adapters.ssm.wsclient import HandshakeError, WsClient
from dbtunneld.core.errors import ProtocolError
from dbtunneld.sandbox.ssm_standin import SsmStandIn
from dbtunneld.sandbox.ssm_standin_cli import build_parser, parse_target, standin_from_args

TARGET = "i-0123456789abcdef0"
ECS = "ecs:orders_0123abcd_0123abcd-456"


@pytest.fixture(scope="module")
def standin():
    s = SsmStandIn(targets={TARGET: ("127.0.0.1", 9), ECS: ("127.0.0.1", 9)}, allow_remote=["127.0.0.1:3306"], credentials={"AKIDSTANDINTEST": "secret"}).start_background()
    yield s
    s.stop_background()


def ssm_api(standin) -> api.SsmApi:
    session = boto3.Session(aws_access_key_id="AKIDSTANDINTEST", aws_secret_access_key="secret", region_name="us-east-1")
    return api.SsmApi(session, endpoint_url=standin.url)


def post(url: str, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_api_calls_need_a_sigv4_authorization_header(standin):
    headers = {"X-Amz-Target": "AmazonSSM.StartSession", "Content-Type": "application/x-amz-json-1.1"}
    status, body = post(standin.url + "/", json.dumps({"Target": TARGET, "DocumentName": "AWS-StartSSHSession"}).encode(), headers)
    assert status == 403 and body["__type"] == "IncompleteSignatureException"
    forged = {**headers, "X-Amz-Date": "20240101T000000Z", "Authorization": "AWS4-HMAC-SHA256 Credential=AKIDSTANDINTEST/20240101/us-east-1/sts/aws4_request, SignedHeaders=host, Signature=" + "0" * 64}
    status, body = post(standin.url + "/", b"{}", forged)
    assert status == 403 and "sts" in body["message"]


def test_api_calls_with_a_wrong_secret_or_an_unknown_key_are_refused(standin):
    wrong = boto3.Session(aws_access_key_id="AKIDSTANDINTEST", aws_secret_access_key="not-the-secret", region_name="us-east-1")
    with pytest.raises(Exception, match="SignatureDoesNotMatch"):
        api.SsmApi(wrong, endpoint_url=standin.url).client.start_session(Target=TARGET, DocumentName="AWS-StartSSHSession")
    unknown = boto3.Session(aws_access_key_id="AKIDNOBODY", aws_secret_access_key="secret", region_name="us-east-1")
    with pytest.raises(Exception, match="InvalidClientTokenId"):
        api.SsmApi(unknown, endpoint_url=standin.url).client.start_session(Target=TARGET, DocumentName="AWS-StartSSHSession")


def test_documents_targets_and_remote_hosts_are_checked(standin):
    client = ssm_api(standin).client
    with pytest.raises(client.exceptions.ClientError, match="InvalidDocument"):
        client.start_session(Target=TARGET, DocumentName="AWS-StartInteractiveCommand")
    with pytest.raises(client.exceptions.ClientError, match="InvalidTarget"):
        client.start_session(Target="i-0aaaaaaaaaaaaaaaa", DocumentName="AWS-StartSSHSession")
    with pytest.raises(client.exceptions.ClientError, match="InvalidParameters"):
        client.start_session(Target=TARGET, DocumentName=api.DOC_PORT_FORWARD_REMOTE, Parameters={"host": ["127.0.0.1"], "portNumber": ["22"]})
    ok = client.start_session(Target=ECS, DocumentName=api.DOC_PORT_FORWARD_REMOTE, Parameters={"host": ["127.0.0.1"], "portNumber": ["3306"]})
    assert ok["SessionId"].startswith("AKIDSTANDINTEST-")


def test_describe_sessions_splits_active_and_history(standin):
    ssm = ssm_api(standin)
    grant = ssm.start_session(TARGET, api.DOC_SSH, api.ssh_parameters(22))
    active = ssm.client.describe_sessions(State="Active", Filters=[{"key": "SessionId", "value": grant.session_id}])["Sessions"]
    assert [(s["SessionId"], s["Status"], s["Target"]) for s in active] == [(grant.session_id, "Connecting", TARGET)]
    ssm.terminate_session(grant.session_id)
    assert ssm.client.describe_sessions(State="Active", Filters=[{"key": "SessionId", "value": grant.session_id}])["Sessions"] == []
    history = ssm.client.describe_sessions(State="History", Filters=[{"key": "SessionId", "value": grant.session_id}])["Sessions"]
    assert history[0]["Status"] == "Terminated" and "EndDate" in history[0]


async def open_channel(url: str, headers: dict[str, str], token: str) -> tuple[WsClient, bytes | str | None]:
    ws = await WsClient.connect(url, headers, open_timeout=5, max_size=1 << 20)
    ws.send_nowait(m.open_data_channel(token, "client-test", "1.2.650.0"))
    try:
        first = await asyncio.wait_for(ws.__anext__(), 5)
    except StopAsyncIteration:
        first = None
    return ws, first


def test_websocket_needs_a_signed_upgrade_and_the_current_token(standin):
    ssm = ssm_api(standin)
    grant = ssm.start_session(TARGET, api.DOC_SSH, api.ssh_parameters(22))

    async def scenario() -> None:
        with pytest.raises(HandshakeError) as info:
            await WsClient.connect(grant.stream_url, {}, open_timeout=5, max_size=1 << 20)
        assert info.value.status == 403
        headers = ssm.websocket_headers(grant.stream_url)
        ws, first = await open_channel(grant.stream_url, headers, "not-the-token")
        assert first is None and ws.close_code == 1008  # refused
        resumed = ssm.resume_session(grant.session_id)
        assert resumed is not None
        ws, first = await open_channel(resumed.stream_url, ssm.websocket_headers(resumed.stream_url), grant.token)
        assert first is None and ws.close_code == 1008  # the old token died with the resume
        ws, first = await open_channel(resumed.stream_url, ssm.websocket_headers(resumed.stream_url), resumed.token)
        msg = m.decode(first)
        assert msg.message_type == m.OUTPUT_STREAM and msg.payload_type == m.HANDSHAKE_REQUEST and msg.flags == m.SYN
        request = json.loads(msg.payload)
        assert request["RequestedClientActions"][0]["ActionParameters"] == {"SessionType": "Port", "Properties": {"portNumber": "22"}}
        await ws.close()

    asyncio.run(scenario())
    row = next(r for r in standin.sessions.values() if r.session_id == grant.session_id)
    assert row.connections == 1
    ssm.terminate_session(grant.session_id)


def test_websocket_to_a_terminated_session_is_refused(standin):
    ssm = ssm_api(standin)
    grant = ssm.start_session(TARGET, api.DOC_SSH, api.ssh_parameters(22))
    ssm.terminate_session(grant.session_id)

    async def scenario() -> None:
        with pytest.raises(HandshakeError) as info:
            await WsClient.connect(grant.stream_url, ssm.websocket_headers(grant.stream_url), open_timeout=5, max_size=1 << 20)
        assert info.value.status == 404

    asyncio.run(scenario())


def control(standin, path: str, body: dict | None = None) -> tuple[int, dict]:
    if body is None:
        with urllib.request.urlopen(standin.url + path, timeout=10) as resp:
            return resp.status, json.loads(resp.read())
    return post(standin.url + path, json.dumps(body).encode(), {"Content-Type": "application/json"})


def test_control_api_faults_and_session_table(standin):
    status, faults = control(standin, "/_standin/faults", {"drop": 0.25, "delay_ms": 3})
    try:
        assert status == 200 and faults["drop"] == 0.25 and faults["delay_ms"] == 3.0
        assert control(standin, "/_standin/faults", {"drop": 1.5})[0] == 400
        assert control(standin, "/_standin/faults", {"explode": True})[0] == 400
    finally:
        control(standin, "/_standin/faults", {"drop": 0, "delay_ms": 0})
    status, table = control(standin, "/_standin/sessions")
    assert status == 200 and all({"SessionId", "Status", "Target", "Stats"} <= set(row) for row in table["sessions"])
    assert control(standin, "/_standin/sessions/nobody/terminate", {})[0] == 404


def test_cli_flags_build_the_stand_in():
    args = build_parser().parse_args(["--port", "0", "--target", f"{TARGET}=127.0.0.1:2222", "--allow-remote", "127.0.0.1,db:3306", "--drop", "0.05", "--agent-payload", "4096"])
    s = standin_from_args(args)
    assert s.targets == {TARGET: ("127.0.0.1", 2222)}
    assert s.allow_remote == ["127.0.0.1", "db:3306"]
    assert s.faults.drop == 0.05 and s.faults.agent_payload == 4096
    with pytest.raises(argparse.ArgumentTypeError):
        parse_target("i-0123=nowhere")
    assert parse_target("*=127.0.0.1:22") == ("*", ("127.0.0.1", 22))


def test_wildcard_target_accepts_only_target_shaped_names():
    s = SsmStandIn(targets={"*": ("127.0.0.1", 22)})
    assert s._target_address("i-0123456789abcdef0") == ("127.0.0.1", 22)
    assert s._target_address(ECS) == ("127.0.0.1", 22)
    assert s._target_address("not-a-target") is None


def test_corrupt_message_is_a_protocol_error_not_a_crash():
    with pytest.raises(ProtocolError):
        m.decode(b"\x00" * 50)


def test_websocket_accepts_a_presigned_url_and_refuses_wrong_secrets(standin):
    from botocore.auth import SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    ssm = ssm_api(standin)
    grant = ssm.start_session(TARGET, api.DOC_SSH, api.ssh_parameters(22))
    assert any(c in grant.stream_url.split("?", 1)[1] for c in "+/=")  # real stream URLs carry them raw

    def presign(secret: str) -> str:
        request = AWSRequest(method="GET", url=grant.stream_url.replace("ws://", "http://", 1))
        SigV4QueryAuth(Credentials("AKIDSTANDINTEST", secret), "ssmmessages", "us-east-1", expires=60).add_auth(request)
        return request.url.replace("http://", "ws://", 1)

    async def scenario() -> None:
        ws, first = await open_channel(presign("secret"), {}, grant.token)
        assert first is not None and m.decode(first).payload_type == m.HANDSHAKE_REQUEST
        await ws.close()
        with pytest.raises(HandshakeError) as info:
            await WsClient.connect(presign("wrong"), {}, open_timeout=5, max_size=1 << 20)
        assert info.value.status == 403 and "SignatureDoesNotMatch" in str(info.value)
        wrong = api.SsmApi(boto3.Session(aws_access_key_id="AKIDSTANDINTEST", aws_secret_access_key="wrong", region_name="us-east-1"), endpoint_url=standin.url)
        with pytest.raises(HandshakeError) as info:
            await WsClient.connect(grant.stream_url, wrong.websocket_headers(grant.stream_url), open_timeout=5, max_size=1 << 20)
        assert info.value.status == 403

    asyncio.run(scenario())
    ssm.terminate_session(grant.session_id)


def test_a_failed_handshake_action_cancels_the_session_like_the_agent(standin):
    """datachannel.go handleHandshakeResponse: any ProcessedClientAction whose ActionStatus is
    not 1 cancels the session; the client then sees channel_closed and the websocket close."""
    ssm = ssm_api(standin)
    grant = ssm.start_session(TARGET, api.DOC_SSH, api.ssh_parameters(22))

    async def scenario() -> str:
        ws, first = await open_channel(grant.stream_url, ssm.websocket_headers(grant.stream_url), grant.token)
        request = m.decode(first)
        ws.send_nowait(m.encode(m.acknowledgement(request)))
        failed = [{"ActionType": "SessionType", "ActionStatus": 2, "ActionResult": None, "Error": "no thanks"}]
        response = m.stream_message(m.INPUT_STREAM, 0, m.HANDSHAKE_RESPONSE, m.handshake_response("1.2.650.0", failed, ["no thanks"]))
        ws.send_nowait(m.encode(response))
        async for raw in ws:
            msg = m.decode(raw)
            if msg.message_type == m.CHANNEL_CLOSED:
                return str(m.json_payload(msg).get("Output"))
        return ""

    output = asyncio.run(scenario())
    assert "SessionType failed on client with status 2 error: no thanks" in output
    row = next(r for r in standin.sessions.values() if r.session_id == grant.session_id)
    assert row.status == "Terminated" and "status 2" in row.reason


def test_remote_hosts_are_resolved_once_per_session(data_server_port):
    """port.go validateParameters: the host is looked up when the session starts; every stream
    dials those addresses, so a DNS change is seen only by a new session."""
    from dbtunneld.adapters.ssm import start_port_forward
    from dbtunneld.sandbox.ssm_testkit import pattern_digest, upload

    lookups: list[str] = []
    answers = {"db.internal": ["127.0.0.1"]}

    def resolve(host: str) -> list[str]:
        lookups.append(host)
        return list(answers[host])

    s = SsmStandIn(targets={TARGET: ("127.0.0.1", 9)}, allow_remote=["db.internal"], credentials={"AKIDSTANDINTEST": "secret"}, resolve=resolve).start_background()
    try:
        aws = boto3.Session(aws_access_key_id="AKIDSTANDINTEST", aws_secret_access_key="secret", region_name="us-east-1")
        with start_port_forward(aws, TARGET, "db.internal", data_server_port, endpoint_url=s.url) as session:
            with session.open_stream() as sock:
                assert upload(sock, 10_000) == pattern_digest(10_000)
            answers["db.internal"] = ["127.0.0.9"]  # "failover": nothing listens there
            with session.open_stream() as sock:  # still dials the address resolved at the start
                assert upload(sock, 10_000) == pattern_digest(10_000)
        assert lookups == ["db.internal"]
    finally:
        s.stop_background()


@pytest.fixture(scope="module")
def data_server_port():
    from dbtunneld.sandbox.ssm_testkit import DataServer

    server = DataServer()
    yield server.port
    server.close()


def test_max_session_duration_ends_even_a_busy_session(standin, data_server_port):
    """The service ends a session at the max session duration whatever its traffic (the idle
    timeout, which data resets, is covered with a tunnel in test_ssm_idle.py)."""
    import time

    from dbtunneld.adapters.ssm import start_port_forward
    from dbtunneld.core.errors import ClosedError

    standin.allow_remote.append(f"127.0.0.1:{data_server_port}")
    standin.faults.update({"max_session_duration": 1.5})
    try:
        aws = boto3.Session(aws_access_key_id="AKIDSTANDINTEST", aws_secret_access_key="secret", region_name="us-east-1")
        with start_port_forward(aws, TARGET, "127.0.0.1", data_server_port, endpoint_url=standin.url) as session:
            with session.open_stream() as sock:
                sock.sendall(b"E\n")
                deadline = time.monotonic() + 6
                while not session.closed.is_set() and time.monotonic() < deadline:
                    sock.sendall(b"still here")  # data keeps flowing: the idle timer never fires
                    sock.recv(100)
            assert session.wait_closed(1)
            assert isinstance(session.last_error, ClosedError)
            assert "maximum session duration of 1.5 seconds" in session.last_error.message
    finally:
        standin.faults.update({"max_session_duration": 0})
