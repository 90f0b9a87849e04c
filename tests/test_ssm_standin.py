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

from dbtunneld.errors import ProtocolError
from dbtunneld.sandbox.ssm_standin import SsmStandIn
from dbtunneld.sandbox.ssm_standin_cli import build_parser, parse_target, standin_from_args
from dbtunneld.ssm import api
from dbtunneld.ssm import message as m
from dbtunneld.ssm.wsclient import HandshakeError, WsClient

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
