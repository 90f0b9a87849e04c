"""The SSM websocket through HTTP proxies and with a CA bundle, as the plugin and boto3 choose them.

Unit tests for the proxy choice, then sessions against the SSM stand-in (its own process) through
a loopback CONNECT proxy (tests/helpers/connect_proxy.py): a TLS-inspecting one in front of a
``wss://`` stream URL whose name only the proxy can resolve (so the data can only have gone
through it, and only AWS_CA_BUNDLE makes the client trust it), and a plain one that NO_PROXY
bypasses.
"""

from __future__ import annotations

import base64
import socket
import ssl

import boto3
import pytest

from dbtunneld.adapters.ssm import start_port_forward
from dbtunneld.adapters.ssm.netpath import parse_proxy, proxy_for
from dbtunneld.core.errors import NeedsUserError
from dbtunneld.sandbox.procs import free_port
from dbtunneld.sandbox.ssm_testkit import DataServer, StandInProcess, download, pattern_digest
from helpers.connect_proxy import ConnectProxy, make_ca_and_cert

TARGET = "i-0123456789abcdef0"
STREAM_NAME = "ssmmessages.sandbox.test"
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "NO_PROXY", "no_proxy", "AWS_CA_BUNDLE")


def aws() -> boto3.Session:
    return boto3.Session(aws_access_key_id="AKIDSSMPROXYTEST", aws_secret_access_key="secret-ssm-proxy-test", region_name="us-east-1")


@pytest.fixture
def env(monkeypatch):
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


# --- which proxy ---------------------------------------------------------------------------------


def test_wss_uses_https_proxy_and_ws_uses_http_proxy():
    environ = {"HTTPS_PROXY": "http://secure:3128", "HTTP_PROXY": "http://plain:8080"}
    assert proxy_for("wss://ssmmessages.eu-west-1.amazonaws.com/v1/data-channel/x?role=p", environ).label == "secure:3128"
    assert proxy_for("ws://ssmmessages.example/v1/data-channel/x", environ).label == "plain:8080"
    assert proxy_for("wss://ssmmessages.example/", {"HTTP_PROXY": "http://plain:8080"}) is None


def test_lowercase_variable_wins_and_no_proxy_suffixes_bypass():
    environ = {"HTTPS_PROXY": "http://upper:1", "https_proxy": "http://lower:2", "no_proxy": ".internal.example, vpce.amazonaws.com"}
    assert proxy_for("wss://ssmmessages.eu-west-1.amazonaws.com/", environ).label == "lower:2"
    assert proxy_for("wss://a.internal.example/", environ) is None
    assert proxy_for("wss://x.vpce.amazonaws.com/", environ) is None
    assert proxy_for("wss://x/", {"HTTPS_PROXY": "http://p:1", "NO_PROXY": "*"}) is None


def test_loopback_is_never_proxied_like_go():
    environ = {"HTTPS_PROXY": "http://p:1", "HTTP_PROXY": "http://p:1"}
    for url in ("ws://127.0.0.1:9/", "wss://localhost/", "ws://[::1]:9/", "ws://127.8.9.10/"):
        assert proxy_for(url, environ) is None, url


def test_proxy_credentials_become_basic_auth_and_stay_out_of_the_repr():
    proxy = parse_proxy("http://alice:s%40cret@proxy.corp:3128")
    assert proxy.authorization == "Basic " + base64.b64encode(b"alice:s@cret").decode()
    assert "s@cret" not in repr(proxy) and "cret" not in proxy.label
    with pytest.raises(ValueError, match="only http:// proxies"):
        parse_proxy("socks5://proxy.corp:1080")


# --- end to end through a proxy ------------------------------------------------------------------


@pytest.fixture(scope="module")
def data_server():
    server = DataServer()
    yield server
    server.close()


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    try:
        return make_ca_and_cert(tmp_path_factory.mktemp("ca"), STREAM_NAME)
    except FileNotFoundError:
        pytest.skip("openssl is not installed")


def _standin(data_server, tmp_path, stream_base: str, port: int = 0) -> StandInProcess:
    args = ["--target", f"{TARGET}=127.0.0.1:{data_server.port}", "--allow-remote", "127.0.0.1", "--stream-base", stream_base]
    if port:
        args += ["--port", str(port)]
    return StandInProcess(*args, log_path=str(tmp_path / "standin.log"), credentials={"AKIDSSMPROXYTEST": "secret-ssm-proxy-test"})


def _download_ok(session, n: int = 300_000) -> bool:
    with session.open_stream(timeout=10) as sock:
        digest, _ = download(sock, n, seed=7)
    return digest == pattern_digest(n, seed=7)


def _inspecting_context(cert, key) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(str(cert), str(key))
    return context


def test_wss_through_a_tls_inspecting_proxy_with_aws_ca_bundle(env, data_server, tls_files, tmp_path):
    ca, cert, key = tls_files
    with _standin(data_server, tmp_path, f"wss://{STREAM_NAME}") as standin:
        standin_port = int(standin.url.rsplit(":", 1)[1])
        auth = "Basic " + base64.b64encode(b"dev:p@ss word").decode()
        with ConnectProxy(lambda host, port: ("127.0.0.1", standin_port), inspect=_inspecting_context(cert, key), required_auth=auth) as proxy:
            env.setenv("HTTPS_PROXY", f"http://dev:p%40ss%20word@127.0.0.1:{proxy.port}")
            env.setenv("AWS_CA_BUNDLE", str(ca))
            with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url) as session:
                assert _download_ok(session)
            assert proxy.requests == [f"{STREAM_NAME}:443"] and proxy.refused == 0


def test_without_the_ca_bundle_the_proxy_certificate_is_refused_with_a_hint(env, data_server, tls_files, tmp_path):
    ca, cert, key = tls_files
    with _standin(data_server, tmp_path, f"wss://{STREAM_NAME}") as standin:
        standin_port = int(standin.url.rsplit(":", 1)[1])
        with ConnectProxy(lambda host, port: ("127.0.0.1", standin_port), inspect=_inspecting_context(cert, key)) as proxy:
            env.setenv("HTTPS_PROXY", proxy.url)
            with pytest.raises(NeedsUserError) as raised:
                start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url, timeout=20)
            assert "AWS_CA_BUNDLE" in raised.value.hint and "certificate" in raised.value.message
            assert standin.sessions()[-1]["Status"] == "Terminated"


def _loopback_name() -> str:
    """This host's name when it resolves to loopback (a name, so Go's loopback rule does not apply)."""
    name = socket.gethostname()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(name, None, socket.AF_INET)}
    except OSError:
        addresses = set()
    if "127.0.0.1" not in addresses:
        pytest.skip(f"host name {name!r} does not resolve to 127.0.0.1")
    return name


def test_ws_goes_through_http_proxy_unless_no_proxy_names_the_host(env, data_server, tmp_path):
    name, port = _loopback_name(), free_port()
    with _standin(data_server, tmp_path, f"ws://{name}:{port}", port=port) as standin:
        with ConnectProxy(lambda host, p: ("127.0.0.1", p)) as proxy:
            env.setenv("HTTP_PROXY", proxy.url)
            env.setenv("NO_PROXY", "127.0.0.1")         # the SSM API itself (boto3) stays direct
            with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url) as session:
                assert _download_ok(session)
            assert proxy.requests == [f"{name}:{port}"]
            env.setenv("NO_PROXY", f"127.0.0.1,{name}")
            with start_port_forward(aws(), TARGET, "127.0.0.1", data_server.port, endpoint_url=standin.url) as session:
                assert _download_ok(session)
            assert proxy.requests == [f"{name}:{port}"]  # nothing new: bypassed
