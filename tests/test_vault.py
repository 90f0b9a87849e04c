"""The hvac adapter against the real stack (OpenBao behind the aws-auth stand-in, moto with
SigV4 enforcement, MariaDB), and its single classification of failures."""

from __future__ import annotations

import http.server
import socket
import threading
from dataclasses import replace

import hvac.exceptions as hexc
import pytest
import requests

from dbtunneld.adapters.vault import VaultClient, VaultRequestError, classify, parse_time
from dbtunneld.core.config import parse_config
from dbtunneld.core.errors import NeedsUserError, PermissionDeniedError, TransientError
from dbtunneld.sandbox.procs import free_port


@pytest.fixture
def vcfg(stack):
    return parse_config(stack.daemon_config()).vault


@pytest.fixture
def login(stack, vcfg):
    """A logged-in client (revoked at the end, which also revokes its leases)."""
    rc = stack.role_credentials()
    client = VaultClient(vcfg)
    token = client.login_aws_iam(rc["aws_access_key_id"], rc["aws_secret_access_key"], rc["aws_session_token"])
    yield client, token
    try:
        client.revoke_self()
    except PermissionDeniedError:
        pass  # the test revoked it already
    client.close()


def test_iam_login_lookup_renew_and_revoke_self(login):
    client, token = login
    assert token.secret not in repr(token)
    assert "db-developer" in token.info.policies and token.info.renewable
    info = client.lookup_self()
    assert info.accessor == token.info.accessor
    assert 0 < info.ttl <= token.info.ttl and info.creation_ttl == token.info.creation_ttl
    assert abs(info.issued_at - token.info.issued_at) < 5
    granted, renewable = client.renew_self(600)
    assert granted == 600 and renewable
    client.revoke_self()
    with pytest.raises(PermissionDeniedError):
        client.lookup_self()


def test_database_creds_renew_and_revoke_drop_the_user(stack, login):
    client, _ = login
    grant = client.database_creds("orders-ro")
    assert grant.password not in repr(grant)
    assert grant.username in stack.dynamic_users("orders")
    renewal = client.renew_lease(grant.lease_id, 120)
    assert renewal.lease_id == grant.lease_id and renewal.duration == 120 and renewal.renewable
    client.revoke_lease(grant.lease_id)
    assert grant.username not in stack.dynamic_users("orders")
    client.revoke_lease(grant.lease_id)  # idempotent
    with pytest.raises(VaultRequestError, match="lease not found"):
        client.renew_lease(grant.lease_id, 120)


def test_unknown_role_is_a_request_error(login):
    client, _ = login
    with pytest.raises(VaultRequestError, match="unknown role") as exc:
        client.database_creds("nope-ro")
    assert "db_role" in exc.value.hint


def test_login_refusals_are_permission_denied(stack, vcfg):
    rc = stack.role_credentials()
    bad_id = VaultClient(replace(vcfg, iam_server_id="vault.somewhere.else"))
    with pytest.raises(PermissionDeniedError) as exc:
        bad_id.login_aws_iam(rc["aws_access_key_id"], rc["aws_secret_access_key"], rc["aws_session_token"])
    assert "iam_server_id" in exc.value.hint
    unbound = stack.role_credentials(role=stack.unbound_role_name)
    with pytest.raises(PermissionDeniedError):
        VaultClient(vcfg).login_aws_iam(unbound["aws_access_key_id"], unbound["aws_secret_access_key"],
                                        unbound["aws_session_token"])
    with pytest.raises(PermissionDeniedError):  # tampered signature: moto refuses the forwarded request
        VaultClient(vcfg).login_aws_iam(rc["aws_access_key_id"], "x" + rc["aws_secret_access_key"][1:],
                                        rc["aws_session_token"])


def test_a_dead_token_is_permission_denied(vcfg):
    client = VaultClient(vcfg, token="s.notavalidtokenatallxxxxxxx")
    with pytest.raises(PermissionDeniedError):
        client.lookup_self()


def test_vault_unreachable_is_transient(vcfg):
    client = VaultClient(replace(vcfg, address=f"http://127.0.0.1:{free_port()}", timeout=2))
    with pytest.raises(TransientError, match="unreachable"):
        client.lookup_self()


class _Counting(http.server.BaseHTTPRequestHandler):
    status = 503
    hits = 0

    def do_GET(self):  # noqa: N802
        type(self).hits += 1
        body = b'{"errors":["Vault is sealed"]}'
        self.send_response(self.status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [503, 502, 500, 429])
def test_server_errors_are_transient_and_never_retried_by_the_adapter(vcfg, status):
    handler = type("H", (_Counting,), {"status": status, "hits": 0})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        client = VaultClient(replace(vcfg, address=f"http://127.0.0.1:{server.server_port}"), token="s.x" * 9)
        with pytest.raises(TransientError):
            client.lookup_self()
        assert handler.hits == 1            # one request: the engine's loop owns retries
    finally:
        server.shutdown()
        server.server_close()


def test_a_hung_vault_times_out_as_transient(vcfg):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)                     # accepts (kernel backlog) but never answers
    try:
        client = VaultClient(replace(vcfg, address=f"http://127.0.0.1:{listener.getsockname()[1]}", timeout=0.5))
        with pytest.raises(TransientError):
            client.lookup_self()
    finally:
        listener.close()


@pytest.mark.parametrize("exc, kind", [
    (requests.exceptions.SSLError("bad cert"), NeedsUserError),
    (requests.exceptions.ConnectionError("refused"), TransientError),
    (requests.exceptions.ReadTimeout("slow"), TransientError),
    (hexc.Forbidden("permission denied"), PermissionDeniedError),
    (hexc.Unauthorized("no"), PermissionDeniedError),
    (hexc.InvalidRequest("lease not found"), VaultRequestError),
    (hexc.InvalidPath("no handler"), VaultRequestError),
    (hexc.VaultDown("sealed"), TransientError),
    (hexc.InternalServerError("boom"), TransientError),
    (hexc.RateLimitExceeded("slow down"), TransientError),
    (ValueError("not json"), TransientError),
])
def test_classification_table(exc, kind):
    got = classify(exc, "doing it", "https://vault.example:8200")
    assert type(got) is kind and got.hint


def test_parse_time_handles_nanoseconds_and_zones():
    assert parse_time("2030-01-01T00:00:00.123456789Z") == pytest.approx(1893456000.123456)
    assert parse_time("2030-01-01T01:00:00+01:00") == 1893456000.0
    assert parse_time("") is None and parse_time("garbage") is None


def test_request_counter_counts_every_answer(login):
    from dbtunneld.adapters.vault import REQUESTS

    client, _token = login
    before = REQUESTS.total
    client.lookup_self()
    client.renew_self(60)
    assert REQUESTS.total == before + 2
