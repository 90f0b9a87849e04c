"""The aws-auth stand-in: logins checked as Vault's plugin checks them, everything else
passed to OpenBao unchanged. Runs against the session stack (moto verifies signatures)."""

from __future__ import annotations

import base64
import http.client
import json
from urllib.parse import urlsplit

import hvac
import pytest
import requests
from hvac import aws_utils

from dbtunneld.sandbox.aws_auth_standin import (Identity, LoginRefused, parse_arn, principal_matches,
                                                validate_body, validate_server_id)

STS_URL = "https://sts.amazonaws.com/"


def login_payload(creds: dict, *, server_id: str | None, role: str | None = "db-developer",
                  sign_server_id: bool = True, tamper: bool = False, body: str | None = None,
                  url: str = STS_URL, method: str = "POST") -> dict:
    """A login body as hvac builds it, with knobs to break one thing at a time."""
    request = aws_utils.generate_sigv4_auth_request(header_value=server_id if sign_server_id else None)
    if body is not None:
        request.body = body
    aws_utils.SigV4Auth(creds["aws_access_key_id"], creds["aws_secret_access_key"],
                        creds.get("aws_session_token"), "us-east-1").add_auth(request)
    if server_id and not sign_server_id:
        request.headers["X-Vault-AWS-IAM-Server-ID"] = server_id
    if tamper:
        auth = request.headers["Authorization"]
        last = auth[-1]
        request.headers["Authorization"] = auth[:-1] + ("0" if last != "0" else "1")
    headers = json.dumps({k: [request.headers[k]] for k in request.headers})
    payload = {"iam_http_request_method": method,
               "iam_request_url": base64.b64encode(url.encode()).decode(),
               "iam_request_headers": base64.b64encode(headers.encode()).decode(),
               "iam_request_body": base64.b64encode(request.body.encode()).decode()}
    if role is not None:
        payload["role"] = role
    return payload


def post_login(stack, payload: dict) -> requests.Response:
    return requests.post(f"{stack.vault_addr}/v1/auth/aws/login", json=payload, timeout=30)


@pytest.fixture(scope="module")
def dev_creds(stack) -> dict:
    return stack.role_credentials("db-developer")


# ------------------------------------------------------------------ accepted

def test_login_issues_a_real_openbao_token(stack, dev_creds):
    client = hvac.Client(url=stack.vault_addr)
    resp = client.auth.aws.iam_login(dev_creds["aws_access_key_id"], dev_creds["aws_secret_access_key"],
                                     dev_creds["aws_session_token"], header_value=stack.server_id,
                                     role="db-developer", region="us-east-1")
    auth = resp["auth"]
    assert auth["policies"] == ["db-developer", "default"]
    assert auth["lease_duration"] == stack.ttls.token_ttl and auth["renewable"] is True
    assert auth["metadata"]["canonical_arn"] == stack.role_arn
    assert auth["metadata"]["client_arn"].startswith("arn:aws:sts::123456789012:assumed-role/db-developer/")
    self_info = client.auth.token.lookup_self()["data"]
    assert self_info["display_name"] == "aws-db-developer" and self_info["path"] == "auth/aws/login"
    # the token is OpenBao's own: it works directly against OpenBao too
    assert hvac.Client(url=stack.bao_addr, token=client.token).auth.token.lookup_self()["data"]["id"] == client.token
    client.auth.token.revoke_self()


def test_role_defaults_to_the_principal_name(stack, dev_creds):
    resp = post_login(stack, login_payload(dev_creds, server_id=stack.server_id, role=None))
    assert resp.status_code == 200, resp.text
    assert resp.json()["auth"]["metadata"]["role"] == "db-developer"


# ------------------------------------------------------------------ refused

def refusal(stack, payload: dict) -> str:
    resp = post_login(stack, payload)
    assert resp.status_code == 400, resp.text
    assert "auth" not in resp.json()
    return resp.json()["errors"][0]


def test_tampered_signature_is_refused_by_sts(stack, dev_creds):
    msg = refusal(stack, login_payload(dev_creds, server_id=stack.server_id, tamper=True))
    assert msg.startswith("error making upstream request: received error code 403 from STS")
    assert "SignatureDoesNotMatch" in msg


def test_wrong_secret_is_refused(stack, dev_creds):
    wrong = dict(dev_creds, aws_secret_access_key="A" + dev_creds["aws_secret_access_key"][1:])
    assert "SignatureDoesNotMatch" in refusal(stack, login_payload(wrong, server_id=stack.server_id))


def test_unknown_access_key_is_refused(stack):
    unknown = {"aws_access_key_id": "AKIAIOSFODNN7EXAMPLE", "aws_secret_access_key": "x" * 40}
    assert "InvalidClientTokenId" in refusal(stack, login_payload(unknown, server_id=stack.server_id))


def test_wrong_server_id_is_refused(stack, dev_creds):
    msg = refusal(stack, login_payload(dev_creds, server_id="vault.evil.example"))
    assert msg == ('error validating X-Vault-AWS-IAM-Server-ID header: expected '
                   f'"{stack.server_id}" but got "vault.evil.example"')


def test_missing_server_id_is_refused(stack, dev_creds):
    msg = refusal(stack, login_payload(dev_creds, server_id=None))
    assert msg == 'error validating X-Vault-AWS-IAM-Server-ID header: missing header "X-Vault-AWS-IAM-Server-ID"'


def test_unsigned_server_id_is_refused(stack, dev_creds):
    msg = refusal(stack, login_payload(dev_creds, server_id=stack.server_id, sign_server_id=False))
    assert msg == "error validating X-Vault-AWS-IAM-Server-ID header: vault header wasn't signed"


def test_unbound_principal_is_refused(stack):
    analyst = stack.role_credentials("analyst")
    msg = refusal(stack, login_payload(analyst, server_id=stack.server_id, role="db-developer"))
    assert msg == ('IAM Principal "arn:aws:sts::123456789012:assumed-role/analyst/alice@example.com" '
                   'does not belong to the role "db-developer"')


def test_unknown_role_is_refused(stack, dev_creds):
    assert refusal(stack, login_payload(dev_creds, server_id=stack.server_id, role="db-admin")) == \
        "entry for role db-admin not found"


def test_other_sts_actions_are_refused(stack, dev_creds):
    body = "Action=GetSessionToken&Version=2011-06-15"
    assert refusal(stack, login_payload(dev_creds, server_id=stack.server_id, body=body)) == "iam request body is invalid"


def test_get_method_and_query_are_refused(stack, dev_creds):
    assert refusal(stack, login_payload(dev_creds, server_id=stack.server_id, method="GET")) == \
        "invalid iam_http_request_method; currently only 'POST' is supported"
    assert refusal(stack, login_payload(dev_creds, server_id=stack.server_id, url=STS_URL + "?Action=X")) == \
        "invalid request"


def test_missing_fields_are_named(stack):
    assert refusal(stack, {"role": "db-developer"}) == "missing iam_http_request_method"
    assert refusal(stack, {"iam_http_request_method": "POST"}) == "missing iam_request_url"


# ------------------------------------------------------------------ the STS endpoint (Vault's sts_endpoint)

def dbtunneld_payload(creds: dict, server_id: str, region: str, endpoint: str = "") -> dict:
    from dbtunneld.adapters.iam_login import login_payload as signed_login

    return signed_login(creds["aws_access_key_id"], creds["aws_secret_access_key"], creds["aws_session_token"],
                        region=region, endpoint=endpoint, server_id=server_id, role="db-developer")


def test_global_endpoint_refuses_a_regional_signature(stack, dev_creds):
    """The session stack's Vault uses the default global endpoint (us-east-1)."""
    msg = refusal(stack, dbtunneld_payload(dev_creds, stack.server_id, "eu-west-1"))
    assert "SignatureDoesNotMatch" in msg and "Credential should be scoped to a valid region" in msg
    # signed for us-east-1 but for another endpoint's host: not a name of sts.amazonaws.com
    msg = refusal(stack, dbtunneld_payload(dev_creds, stack.server_id, "us-east-1",
                                           endpoint="https://sts.eu-west-1.amazonaws.com"))
    assert "is not a name of https://sts.amazonaws.com" in msg
    ok = post_login(stack, dbtunneld_payload(dev_creds, stack.server_id, "us-east-1"))
    assert ok.status_code == 200, ok.text
    requests.post(f"{stack.vault_addr}/v1/auth/token/revoke-self", timeout=10,
                  headers={"X-Vault-Token": ok.json()["auth"]["client_token"]})


def test_vault_picks_the_sts_endpoint_as_configured():
    from dbtunneld.sandbox import sts_endpoint as sts

    scope = "AWS4-HMAC-SHA256 Credential=ASIAX/20260101/ap-south-1/sts/aws4_request, SignedHeaders=host, Signature=0"
    assert sts.vault_target("", "", False, scope) == sts.StsTarget("https://sts.amazonaws.com", "us-east-1")
    assert sts.vault_target("", "", True, scope) == sts.StsTarget("https://sts.ap-south-1.amazonaws.com", "ap-south-1")
    with pytest.raises(ValueError, match="region missing from Authorization header"):
        sts.vault_target("", "", True, "")
    vpce = "https://vpce-0abc-xyz.sts.eu-central-1.vpce.amazonaws.com"
    assert sts.vault_target(vpce, "", False, scope).region == "eu-central-1"
    proxy = sts.vault_target("https://sts-proxy.corp.example", "eu-north-1", False, scope)
    assert proxy.region == "eu-north-1"
    sts.check_accepts(proxy, "sts.eu-north-1.amazonaws.com", scope.replace("ap-south-1", "eu-north-1"))
    with pytest.raises(sts.StsRefusal, match="scoped to a valid region"):
        sts.check_accepts(proxy, "sts.eu-north-1.amazonaws.com", scope)
    with pytest.raises(sts.StsRefusal, match="not a name of"):
        sts.check_accepts(sts.StsTarget(vpce, "eu-central-1"), "sts.amazonaws.com",
                          scope.replace("ap-south-1", "eu-central-1"))


def test_namespaced_login_route(stack, dev_creds):
    """The session stack's aws mount is in the root namespace: a login routed into another
    namespace is not the stand-in's; OpenBao answers it (no such namespace or mount)."""
    payload = login_payload(dev_creds, server_id=stack.server_id)
    resp = requests.post(f"{stack.vault_addr}/v1/auth/aws/login", json=payload, timeout=30,
                         headers={"X-Vault-Namespace": "team-a"})
    assert resp.status_code in (400, 403, 404) and "auth" not in resp.json(), resp.text
    resp = requests.post(f"{stack.vault_addr}/v1/team-a/auth/aws/login", json=payload, timeout=30)
    assert resp.status_code in (400, 403, 404) and "auth" not in resp.json(), resp.text


# ------------------------------------------------------------------ the proxy

def test_other_paths_reach_openbao_unchanged(stack):
    for path in ("/v1/sys/health", "/v1/sys/nonexistent", "/v1/auth/token/lookup-self"):
        direct = requests.get(stack.bao_addr + path, timeout=10)
        front = requests.get(stack.vault_addr + path, timeout=10)
        assert front.status_code == direct.status_code, path
        if path != "/v1/sys/health":   # health carries a timestamp
            assert front.json() == direct.json(), path
    root = {"X-Vault-Token": stack.root_token}
    listing = requests.request("LIST", f"{stack.vault_addr}/v1/database/roles", headers=root, timeout=10)
    assert listing.status_code == 200
    assert {"orders-ro", "orders-rw", "billing-ro", "billing-rw"} <= set(listing.json()["data"]["keys"])


def test_proxy_keeps_the_connection_alive(stack):
    target = urlsplit(stack.vault_addr)
    conn = http.client.HTTPConnection(target.hostname, target.port, timeout=10)
    conn.connect()
    sock = conn.sock
    for _ in range(5):
        conn.request("GET", "/v1/sys/seal-status")
        resp = conn.getresponse()
        assert resp.status == 200 and json.loads(resp.read())["sealed"] is False
    assert conn.sock is sock
    conn.close()


# ------------------------------------------------------------------ pure checks

def test_assumed_role_maps_to_role_arn():
    ident = parse_arn("arn:aws:sts::123456789012:assumed-role/db-developer/alice@example.com", "AROA:alice", "")
    assert ident.canonical_arn == "arn:aws:iam::123456789012:role/db-developer"
    user = parse_arn("arn:aws:iam::123456789012:user/path/dev-alice", "AIDA", "")
    assert user.canonical_arn == "arn:aws:iam::123456789012:user/dev-alice"
    with pytest.raises(LoginRefused, match="unrecognized principal type"):
        parse_arn("arn:aws:iam::123456789012:group/devs", "", "")


def test_bindings_match_exactly_or_by_trailing_glob():
    ident = Identity("arn:aws:sts::1:assumed-role/db-dev/s", "X", "1", "assumed-role", "db-dev", "aws")
    assert principal_matches(["arn:aws:iam::1:role/db-dev"], ident)
    assert principal_matches(["arn:aws:iam::1:role/db-*"], ident)
    assert not principal_matches(["arn:aws:iam::1:role/db-developer"], ident)
    assert not principal_matches(["arn:aws:iam::2:role/*"], ident)


def test_body_and_header_checks():
    validate_body("Action=GetCallerIdentity&Version=2011-06-15")
    for bad in ("Action=GetCallerIdentity&Action=GetCallerIdentity", "Action=AssumeRole",
                "Action=GetCallerIdentity&RoleArn=x"):
        with pytest.raises(LoginRefused):
            validate_body(bad)
    headers = [("X-Vault-AWS-IAM-Server-ID", ["v"]),
               ("Authorization", ["AWS4-HMAC-SHA256 Credential=A/x, SignedHeaders=host;x-vault-aws-iam-server-id, Signature=s"])]
    validate_server_id(headers, "v")
    with pytest.raises(LoginRefused, match="missing Authorization header"):
        validate_server_id(headers[:1], "v")


def test_chunked_request_bodies_are_forwarded(stack):
    body = json.dumps({"policies": ["default"], "ttl": "1m"}).encode()
    resp = requests.post(f"{stack.vault_addr}/v1/auth/token/create", data=iter([body[:10], body[10:]]),
                         headers={"X-Vault-Token": stack.root_token}, timeout=10)   # a generator: chunked
    assert resp.status_code == 200, resp.text
    assert resp.json()["auth"]["policies"] == ["default"]
