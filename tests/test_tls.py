"""TLS trust for the SSM websocket: AWS_CA_BUNDLE is honoured, and a Python whose OpenSSL has no
CA certificates (python.org's macOS installer before "Install Certificates.command") falls back
to the OS trust store (truststore) or certifi. The websocket test uses a real wss:// server on
loopback with a private CA (openssl CLI) and the project's own websocket client."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from dbtunneld.adapters import tls
from dbtunneld.adapters.ssm.wsclient import WsClient

NO_PATHS = ssl.DefaultVerifyPaths(None, None, "SSL_CERT_FILE", "/nonexistent/cert.pem", "SSL_CERT_DIR",
                                  "/nonexistent/certs")


def empty_default() -> ssl.SSLContext:
    """What ssl.create_default_context() gives on python.org's macOS Python: verifying, no CAs."""
    return ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)


def test_a_default_context_with_cas_is_used_as_is():
    import certifi

    loaded = ssl.create_default_context(cafile=certifi.where())          # Windows' store, a cafile
    assert tls.client_ssl_context({}, default=lambda: loaded, verify_paths=lambda: NO_PATHS) is loaded
    empty = empty_default()                                                # Debian: a CA folder read on demand
    folder = ssl.DefaultVerifyPaths(None, "/etc/ssl/certs", "SSL_CERT_FILE", "", "SSL_CERT_DIR", "/etc/ssl/certs")
    assert tls.client_ssl_context({}, default=lambda: empty, verify_paths=lambda: folder) is empty


def test_no_ca_paths_falls_back_to_the_os_trust_store():
    truststore = pytest.importorskip("truststore")
    ctx = tls.client_ssl_context({}, default=empty_default, verify_paths=lambda: NO_PATHS)
    assert isinstance(ctx, truststore.SSLContext)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname


def test_no_ca_paths_and_no_truststore_falls_back_to_certifi(monkeypatch):
    monkeypatch.setitem(sys.modules, "truststore", None)          # import truststore -> ImportError
    ctx = tls.client_ssl_context({}, default=empty_default, verify_paths=lambda: NO_PATHS)
    assert ctx.cert_store_stats()["x509_ca"] > 50 and ctx.check_hostname


def test_a_bad_aws_ca_bundle_names_the_variable_and_the_fix(tmp_path):
    with pytest.raises(tls.CaBundleError) as info:
        tls.client_ssl_context({"AWS_CA_BUNDLE": str(tmp_path / "missing.pem")})
    assert "AWS_CA_BUNDLE=" in info.value.message and "PEM" in info.value.hint


# ----------------------------------------------------------------------------- a real wss:// server

@pytest.fixture(scope="module")
def private_ca(tmp_path_factory):
    if not shutil.which("openssl"):
        pytest.skip("needs the openssl CLI")
    d = tmp_path_factory.mktemp("ca")

    def run(*args):
        subprocess.run(["openssl", *args], cwd=d, check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=dbtunneld test CA", "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=localhost")
    (d / "ext.cnf").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.pem", "-days", "2", "-extfile", "ext.cnf")
    return d


@pytest.fixture
def wss_server(private_ca):
    from websockets.sync.server import serve

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(private_ca / "server.pem", private_ca / "server.key")
    server = serve(lambda ws: ws.send("hello over tls"), "127.0.0.1", 0, ssl=ctx)
    thread = threading.Thread(target=server.serve_forever, name="wss-server", daemon=True)
    thread.start()
    yield f"wss://localhost:{server.socket.getsockname()[1]}/"
    server.shutdown()
    thread.join(5)


async def first_message(url: str) -> str:
    client = await WsClient.connect(url, {}, open_timeout=5, max_size=1 << 20)
    try:
        return await client.__anext__()
    finally:
        client.abort()


def test_the_ssm_websocket_trusts_aws_ca_bundle(wss_server, private_ca, monkeypatch):
    monkeypatch.setenv("AWS_CA_BUNDLE", str(private_ca / "ca.pem"))
    assert asyncio.run(first_message(wss_server)) == "hello over tls"


def test_without_the_bundle_an_unknown_ca_is_refused(wss_server, monkeypatch):
    monkeypatch.delenv("AWS_CA_BUNDLE", raising=False)
    with pytest.raises(ssl.SSLCertVerificationError):
        asyncio.run(first_message(wss_server))
