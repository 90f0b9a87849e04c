"""SSM API glue (dbtunneld.adapters.ssm.api) and the session-manager-plugin fallback (dbtunneld.adapters.ssm.plugin).

The plugin itself cannot be installed here: its argument contract and SIGINT handling are
checked with a FAKE plugin script (``fake-session-manager-plugin``) that records what it got.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from pathlib import Path

import boto3
import pytest
from botocore import exceptions as bexc

from dbtunneld.core.errors import (
    ConfigError,
    NeedsUserError,
    PermissionDeniedError,
    SignInNeededError,
    TransientError,
)
from dbtunneld.adapters.ssm import api, plugin
from dbtunneld.sandbox.ssm_standin import SsmStandIn

TARGET = "i-0123456789abcdef0"


def boto(token: str | None = "session-token-ssm-test") -> boto3.Session:
    return boto3.Session(aws_access_key_id="AKIDSSMAPITEST", aws_secret_access_key="secret-ssm-api-test", aws_session_token=token, region_name="eu-west-1")


@pytest.fixture(scope="module")
def standin():
    s = SsmStandIn(targets={TARGET: ("127.0.0.1", 9)}, allow_remote=["db.internal"], credentials={"AKIDSSMAPITEST": "secret-ssm-api-test"}).start_background()
    yield s
    s.stop_background()


# --- targets and parameters ---------------------------------------------------------------------


@pytest.mark.parametrize("target", ["i-0123456789abcdef0", "i-01234567", "mi-0123456789abcdef0", "ecs:orders_0123456789abcdef0123456789abcdef_0123456789abcdef0123456789abcdef-1234567890"])
def test_valid_targets(target):
    assert api.validate_target(target) == target


@pytest.mark.parametrize("target", ["", "bastion", "i-XYZ", "ecs:cluster_task", "arn:aws:ec2:eu-west-1:1:instance/i-0123"])
def test_invalid_targets_name_the_key_and_the_fix(target):
    with pytest.raises(ConfigError) as info:
        api.validate_target(target)
    problem = info.value.problems[0]
    assert problem.path == "target" and "instance id" in problem.fix


def test_document_parameters_are_lists_of_strings():
    assert api.ssh_parameters(22) == {"portNumber": ["22"]}
    assert api.port_forward_parameters("db.internal", 3306) == {"host": ["db.internal"], "portNumber": ["3306"]}
    with pytest.raises(ConfigError):
        api.port_forward_parameters("db.internal", 0)
    with pytest.raises(ConfigError):
        api.port_forward_parameters("", 3306)


def test_redact_url_drops_the_query_string():
    url = "wss://ssmmessages.eu-west-1.amazonaws.com/v1/data-channel/s-1?role=publish_subscribe&cell-number=SECRET"
    assert api.redact_url(url) == "wss://ssmmessages.eu-west-1.amazonaws.com/v1/data-channel/s-1"


def test_grant_repr_hides_the_token():
    grant = api.Grant("s-1", "wss://x/v1/data-channel/s-1", "tok-very-secret")
    assert "tok-very-secret" not in repr(grant)


# --- SigV4 for the websocket upgrade --------------------------------------------------------------


def test_websocket_upgrade_is_signed_for_ssmmessages():
    ssm_api = api.SsmApi(boto(), endpoint_url="http://127.0.0.1:9")
    headers = ssm_api.websocket_headers("wss://ssmmessages.eu-west-1.amazonaws.com/v1/data-channel/s-1?role=publish_subscribe")
    auth = headers["Authorization"]
    assert re.match(r"AWS4-HMAC-SHA256 Credential=AKIDSSMAPITEST/\d{8}/eu-west-1/ssmmessages/aws4_request, SignedHeaders=[^,]*host[^,]*, Signature=[0-9a-f]{64}$", auth)
    assert re.match(r"\d{8}T\d{6}Z$", headers["X-Amz-Date"])
    assert headers["X-Amz-Security-Token"] == "session-token-ssm-test"


# An independent SigV4, written here from AWS's documentation (not from dbtunneld or botocore):
# canonical request, string to sign, HMAC chain. Its canonical query follows aws-sdk-go v1, which
# the session-manager-plugin signs with (aws/signer/v4/v4.go: url.Query().Encode(), "+" -> "%20"):
# the query is decoded ("+" is a space) and every key and value escaped except A-Za-z0-9-_.~.
def _go_query(query: str) -> str:
    from urllib.parse import quote, unquote_plus

    pairs = [part.partition("=")[::2] for part in query.split("&") if part]
    decoded = sorted((unquote_plus(k), unquote_plus(v)) for k, v in pairs)
    return "&".join(f"{quote(k, safe='-_.~')}={quote(v, safe='-_.~')}" for k, v in decoded)


def _sigv4(secret: str, amz_date: str, region: str, service: str, host: str, path: str, query: str, headers: dict[str, str]) -> str:
    import hashlib
    import hmac

    signed = sorted({"host": host, **{k.lower(): v for k, v in headers.items()}}.items())
    canonical = "\n".join(["GET", path, query, "".join(f"{k}:{v}\n" for k, v in signed), ";".join(k for k, _ in signed), hashlib.sha256(b"").hexdigest()])
    scope = f"{amz_date[:8]}/{region}/{service}/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = ("AWS4" + secret).encode()
    for part in (amz_date[:8], region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def test_the_independent_sigv4_reproduces_aws_test_suite_get_vanilla():
    # aws-sig-v4-test-suite "get-vanilla": GET / on example.amazonaws.com, 20150830T123600Z
    signature = _sigv4("wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY", "20150830T123600Z", "us-east-1", "service", "example.amazonaws.com", "/", "", {"X-Amz-Date": "20150830T123600Z"})
    assert signature == "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"


def test_stream_url_query_is_signed_as_aws_sdk_go_v1_encodes_it():
    """A stream URL with a raw ``+``, ``/`` and ``=`` in its query (as real ones carry): the
    signature must be the one the service computes over the Go-encoded query; botocore on the raw
    URL signs ``/`` and ``=`` unescaped and ``+`` as ``+``, which the service rejects."""
    url = "wss://ssmmessages.eu-west-1.amazonaws.com/v1/data-channel/s-1?role=publish_subscribe&cell-number=AAEAAb+c/dE=="
    assert _go_query("role=publish_subscribe&cell-number=AAEAAb+c/dE==") == "cell-number=AAEAAb%20c%2FdE%3D%3D&role=publish_subscribe"
    assert api.go_query_encode("role=publish_subscribe&cell-number=AAEAAb+c/dE==") == "cell-number=AAEAAb%20c%2FdE%3D%3D&role=publish_subscribe"
    headers = api.SsmApi(boto(), endpoint_url="http://127.0.0.1:9").websocket_headers(url)
    amz_date = headers["X-Amz-Date"]
    expected = _sigv4("secret-ssm-api-test", amz_date, "eu-west-1", "ssmmessages", "ssmmessages.eu-west-1.amazonaws.com", "/v1/data-channel/s-1",
                      _go_query("role=publish_subscribe&cell-number=AAEAAb+c/dE=="), {"X-Amz-Date": amz_date, "X-Amz-Security-Token": "session-token-ssm-test"})
    assert headers["Authorization"].endswith(f"Signature={expected}")
    assert "SignedHeaders=host;x-amz-date;x-amz-security-token," in headers["Authorization"]


def test_presigned_stream_urls_are_dialled_as_they_are():
    presigned = ("wss://ssmmessages.eu-west-1.amazonaws.com/v1/data-channel/s-1?role=publish_subscribe&X-Amz-Algorithm=AWS4-HMAC-SHA256"
                 "&X-Amz-Credential=AKID%2F20260101%2Feu-west-1%2Fssmmessages%2Faws4_request&X-Amz-Date=20260101T000000Z&X-Amz-Expires=60"
                 "&X-Amz-SignedHeaders=host&X-Amz-Signature=" + "ab" * 32)
    assert api.SsmApi(boto(), endpoint_url="http://127.0.0.1:9").websocket_headers(presigned) == {}


def test_websocket_signature_without_session_token_has_no_token_header():
    headers = api.SsmApi(boto(token=None), endpoint_url="http://127.0.0.1:9").websocket_headers("ws://127.0.0.1:1/v1/data-channel/s")
    assert "X-Amz-Security-Token" not in headers


def test_missing_region_needs_the_user(tmp_path, monkeypatch):
    (tmp_path / "config").write_text("")                # no profile may supply a region
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    monkeypatch.delenv("AWS_REGION", raising=False)
    session = boto3.Session(aws_access_key_id="a", aws_secret_access_key="b")
    assert session.region_name is None
    with pytest.raises(NeedsUserError, match="region"):
        api.SsmApi(session)


# --- error classification -------------------------------------------------------------------------


def client_error(code: str, status: int = 400) -> bexc.ClientError:
    return bexc.ClientError({"Error": {"Code": code, "Message": f"{code} happened"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "StartSession")


@pytest.mark.parametrize(
    "exc, kind",
    [
        (client_error("ExpiredTokenException"), SignInNeededError),
        (client_error("AccessDeniedException"), PermissionDeniedError),
        (client_error("InvalidTarget"), NeedsUserError),
        (client_error("TargetNotConnected"), TransientError),
        (client_error("ThrottlingException"), TransientError),
        (client_error("InternalServerError", 500), TransientError),
        (client_error("Whatever", 503), TransientError),
        (bexc.NoCredentialsError(), SignInNeededError),
        (bexc.EndpointConnectionError(endpoint_url="https://ssm.eu-west-1.amazonaws.com"), TransientError),
        (bexc.ReadTimeoutError(endpoint_url="https://ssm"), TransientError),
    ],
)
def test_classification_table(exc, kind):
    error = api.classify_error(exc, "StartSession", f"target {TARGET}")
    assert type(error) is kind
    assert "StartSession" in error.message and TARGET in error.message


def test_permission_errors_say_which_actions_are_needed():
    error = api.classify_error(client_error("AccessDeniedException"), "StartSession", "x")
    assert "ssm:StartSession" in error.hint


def test_start_session_errors_from_the_stand_in_are_classified(standin):
    ssm_api = api.SsmApi(boto(), endpoint_url=standin.url)
    with pytest.raises(NeedsUserError, match="InvalidTarget"):
        ssm_api.start_session("i-0fffffffffffffff0", api.DOC_SSH, api.ssh_parameters(22))
    with pytest.raises(NeedsUserError, match="InvalidParameters"):
        ssm_api.start_session(TARGET, api.DOC_PORT_FORWARD_REMOTE, api.port_forward_parameters("elsewhere", 3306))


def test_start_resume_terminate_against_the_stand_in(standin):
    ssm_api = api.SsmApi(boto(), endpoint_url=standin.url)
    grant = ssm_api.start_session(TARGET, api.DOC_PORT_FORWARD_REMOTE, api.port_forward_parameters("db.internal", 3306))
    assert grant.stream_url.startswith(f"ws://127.0.0.1:{standin.port}/v1/data-channel/{grant.session_id}?")
    resumed = ssm_api.resume_session(grant.session_id)
    assert resumed is not None and resumed.token != grant.token
    ssm_api.terminate_session(grant.session_id)
    assert ssm_api.resume_session(grant.session_id) is None  # over: no token
    with pytest.raises(NeedsUserError, match="DoesNotExist"):
        ssm_api.terminate_session("nobody-0123")


# --- the plugin fallback ------------------------------------------------------------------------------

FAKE_PLUGIN = '''#!{python}
"""FAKE session-manager-plugin for tests: records its argv/env, echoes stdin, exits on SIGINT."""
import json, os, signal, sys
record = os.environ["FAKE_PLUGIN_RECORD"]
env_name = sys.argv[1]
def write(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)  # readers never see a half-written file
write(record, json.dumps({{"argv": sys.argv, "response": os.environ.get(env_name), "aws_key": os.environ.get("AWS_ACCESS_KEY_ID")}}))
def on_signal(signum, frame):
    write(record + ".signal", signal.Signals(signum).name)
    sys.exit(0)
signal.signal(signal.SIGINT, on_signal)
signal.signal(signal.SIGTERM, on_signal)
sys.stdout.write("\\nStarting session with SessionId: fake\\n")
sys.stdout.flush()
while True:
    data = os.read(0, 65536)
    if not data:
        signal.pause()
    os.write(1, data)
'''


@pytest.fixture
def fake_plugin(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "fake-session-manager-plugin"
    path.write_text(FAKE_PLUGIN.format(python=sys.executable))
    path.chmod(0o755)
    monkeypatch.setenv("FAKE_PLUGIN_RECORD", str(tmp_path / "record.json"))
    return path


def test_missing_plugin_is_a_clear_needs_user_error(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(NeedsUserError) as info:
        plugin.find_plugin()
    assert "session-manager-plugin is not installed" in info.value.message
    assert "install" in info.value.hint and "built-in client" in info.value.hint
    with pytest.raises(NeedsUserError):
        plugin.PluginProxy.start(boto(), TARGET, endpoint_url="http://127.0.0.1:9")


def wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert path.exists(), f"{path} did not appear"


def test_fake_plugin_gets_the_cli_argument_contract_without_the_token_in_argv(fake_plugin, standin):
    proxy = plugin.PluginProxy.start(boto(), TARGET, port=22, endpoint_url=standin.url, plugin_path=str(fake_plugin))
    try:
        record_path = Path(os.environ["FAKE_PLUGIN_RECORD"])
        wait_for(record_path)
        record = json.loads(record_path.read_text())
        argv = record["argv"]
        assert len(argv) == 7
        assert argv[1].startswith("AWS_SSM_START_SESSION_RESPONSE_")
        assert argv[2:5] == ["eu-west-1", "StartSession", ""]
        assert json.loads(argv[5]) == {"Target": TARGET, "DocumentName": "AWS-StartSSHSession", "Parameters": {"portNumber": ["22"]}}
        assert argv[6] == standin.url
        response = json.loads(record["response"])
        assert response["SessionId"] == proxy.session_id and response["TokenValue"] and response["StreamUrl"]
        assert response["TokenValue"] not in " ".join(argv)
        assert record["aws_key"] == "AKIDSSMAPITEST"
        # paramiko-style socket face: bytes through stdin/stdout
        proxy.settimeout(5)
        assert b"Starting session" in proxy.recv(100)
        proxy.send(b"SSH-2.0-test\r\n")
        assert proxy.recv(100) == b"SSH-2.0-test\r\n"
    finally:
        proxy.close()
    assert (record_path.parent / "record.json.signal").read_text() == "SIGINT"
    assert proxy.closed and proxy.process.returncode == 0
    row = next(r for r in standin.sessions.values() if r.session_id == proxy.session_id)
    assert row.status == "Terminated"  # TerminateSession after the plugin exits


def test_recv_times_out_like_a_socket(fake_plugin, standin):
    import socket

    with plugin.PluginProxy.start(boto(), TARGET, endpoint_url=standin.url, plugin_path=str(fake_plugin)) as proxy:
        proxy.settimeout(5)
        proxy.recv(100)  # the banner line
        proxy.settimeout(0.05)
        with pytest.raises(socket.timeout):
            proxy.recv(100)


def test_plugin_that_ignores_sigint_is_killed_after_the_bound(tmp_path, monkeypatch, standin):
    stubborn = tmp_path / "fake-stubborn-plugin"
    stubborn.write_text(f"#!{sys.executable}\nimport signal, time\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\nprint('ready', flush=True)\ntime.sleep(60)\n")
    stubborn.chmod(0o755)
    monkeypatch.setattr(plugin, "STOP_TIMEOUT", 0.3)
    proxy = plugin.PluginProxy.start(boto(), TARGET, endpoint_url=standin.url, plugin_path=str(stubborn))
    proxy.settimeout(10)
    assert proxy.recv(10).startswith(b"ready")
    proxy.close()
    assert proxy.process.returncode == -signal.SIGKILL
