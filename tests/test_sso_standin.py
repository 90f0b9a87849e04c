"""The SSO portal / OIDC device-flow stand-in: botocore's own clients and token provider
against it (wire format), and its state machine under a fake clock (timing rules)."""

from __future__ import annotations

import datetime
import hashlib
import json
import urllib.error
import urllib.request

import boto3
import botocore.session
import pytest

from dbtunneld.sandbox.sso_standin import DEVICE_GRANT, ApiError, SsoConfig, SsoState
from dbtunneld.sandbox.stack import start_stack


@pytest.fixture(scope="module")
def sso_stack():
    """A private stack with only moto and the SSO stand-in: these tests expire and revoke
    every SSO token, which must not disturb the session stack."""
    with start_stack(vault=False, ssh=False, ssm=False, clusters=()) as s:
        yield s


def clients(stack, region: str | None = None):
    """boto3 clients of ``region``'s endpoints (default: the Identity Center's region)."""
    oidc = boto3.client("sso-oidc", endpoint_url=stack.oidc_url(region), region_name=region or "us-east-1")
    sso = boto3.client("sso", endpoint_url=stack.portal_url(region), region_name=region or "us-east-1")
    return oidc, sso


def start_device_flow(oidc, stack):
    reg = oidc.register_client(clientName="dbtunneld-test", clientType="public")
    auth = oidc.start_device_authorization(clientId=reg["clientId"], clientSecret=reg["clientSecret"],
                                           startUrl=stack.sso_start_url)
    return reg, auth


def create_token(oidc, reg, auth):
    return oidc.create_token(clientId=reg["clientId"], clientSecret=reg["clientSecret"],
                             grantType=DEVICE_GRANT, deviceCode=auth["deviceCode"])


def visit(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status
    except urllib.error.HTTPError as exc:
        return exc.code


# ------------------------------------------------------------------ over the wire (boto3)

def test_device_flow_pending_slow_down_then_token(sso_stack):
    oidc, sso = clients(sso_stack)
    reg, auth = start_device_flow(oidc, sso_stack)
    assert auth["verificationUriComplete"].endswith(f"user_code={auth['userCode']}")
    assert auth["interval"] == 1 and auth["expiresIn"] == 600
    with pytest.raises(oidc.exceptions.AuthorizationPendingException) as pending:
        create_token(oidc, reg, auth)
    assert pending.value.response["Error"]["Code"] == "AuthorizationPendingException"
    with pytest.raises(oidc.exceptions.SlowDownException):
        create_token(oidc, reg, auth)          # polled again at once: sooner than interval
    assert visit(auth["verificationUriComplete"]) == 200   # the user allows it in the browser
    token = poll_until_issued(oidc, reg, auth)
    assert token["tokenType"] == "Bearer" and token["refreshToken"]
    accounts = sso.list_accounts(accessToken=token["accessToken"])["accountList"]
    assert [a["accountId"] for a in accounts] == [sso_stack.account_id]
    roles = sso.list_account_roles(accessToken=token["accessToken"], accountId=sso_stack.account_id)["roleList"]
    assert {r["roleName"] for r in roles} == {"db-developer", "analyst"}


def poll_until_issued(oidc, reg, auth, attempts: int = 10):
    import time

    for _ in range(attempts):
        time.sleep(auth["interval"])
        try:
            return create_token(oidc, reg, auth)
        except (oidc.exceptions.AuthorizationPendingException, oidc.exceptions.SlowDownException):
            continue
    raise AssertionError("no token issued")


def test_role_credentials_are_real_moto_credentials(sso_stack):
    oidc, sso = clients(sso_stack)
    reg, auth = start_device_flow(oidc, sso_stack)
    assert sso_stack.sso.approve(auth["userCode"]) is True
    token = poll_until_issued(oidc, reg, auth)
    rc = sso.get_role_credentials(accessToken=token["accessToken"], accountId=sso_stack.account_id,
                                  roleName="db-developer")["roleCredentials"]
    sts = boto3.client("sts", endpoint_url=sso_stack.aws_endpoint, region_name="us-east-1",
                       aws_access_key_id=rc["accessKeyId"], aws_secret_access_key=rc["secretAccessKey"],
                       aws_session_token=rc["sessionToken"])
    assert sts.get_caller_identity()["Arn"] == "arn:aws:sts::123456789012:assumed-role/db-developer/alice@example.com"
    with pytest.raises(sso.exceptions.ClientError) as denied:
        sso.get_role_credentials(accessToken=token["accessToken"], accountId=sso_stack.account_id,
                                 roleName="administrator")
    assert denied.value.response["Error"]["Code"] == "ForbiddenException"


def test_expired_and_revoked_tokens(sso_stack):
    oidc, sso = clients(sso_stack)
    reg, auth = start_device_flow(oidc, sso_stack)
    sso_stack.sso.approve(auth["userCode"])
    token = poll_until_issued(oidc, reg, auth)
    sso_stack.sso.expire_tokens()
    with pytest.raises(sso.exceptions.UnauthorizedException):
        sso.list_accounts(accessToken=token["accessToken"])
    fresh = oidc.create_token(clientId=reg["clientId"], clientSecret=reg["clientSecret"],
                              grantType="refresh_token", refreshToken=token["refreshToken"])
    assert sso.list_accounts(accessToken=fresh["accessToken"])["accountList"]
    sso_stack.sso.revoke_tokens()
    with pytest.raises(sso.exceptions.UnauthorizedException):
        sso.list_accounts(accessToken=fresh["accessToken"])
    with pytest.raises(oidc.exceptions.InvalidGrantException):
        oidc.create_token(clientId=reg["clientId"], clientSecret=reg["clientSecret"],
                          grantType="refresh_token", refreshToken=fresh["refreshToken"])


def test_denied_and_unknown_codes(sso_stack):
    oidc, _ = clients(sso_stack)
    reg, auth = start_device_flow(oidc, sso_stack)
    assert sso_stack.sso.deny(auth["userCode"]) is True
    with pytest.raises(oidc.exceptions.AccessDeniedException):
        create_token(oidc, reg, auth)
    assert visit(f"{sso_stack.sso_endpoint}/device?user_code=BCDF-GHJK") == 404
    with pytest.raises(oidc.exceptions.InvalidClientException):
        oidc.start_device_authorization(clientId=reg["clientId"], clientSecret="wrong", startUrl=sso_stack.sso_start_url)


def test_botocore_token_provider_refreshes_an_expired_cached_token(sso_stack, tmp_path, monkeypatch):
    """botocore itself (profile with sso_session) refreshes through CreateToken and then
    fetches role credentials: the stand-in speaks its wire format."""
    oidc, _ = clients(sso_stack)
    reg, auth = start_device_flow(oidc, sso_stack)
    sso_stack.sso.approve(auth["userCode"])
    token = poll_until_issued(oidc, reg, auth)
    past = (datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    far = (datetime.datetime.now(datetime.timezone.utc) + datetime.timedelta(days=30)).strftime("%Y-%m-%dT%H:%M:%SZ")
    cache = tmp_path / "cache"
    cache.mkdir()
    from botocore.tokens import SSOTokenProvider
    from botocore.utils import JSONFileCache

    entry = {"startUrl": sso_stack.sso_start_url, "region": "us-east-1", "accessToken": "stale",
             "expiresAt": past, "clientId": reg["clientId"], "clientSecret": reg["clientSecret"],
             "registrationExpiresAt": far, "refreshToken": token["refreshToken"]}
    (cache / (hashlib.sha1(sso_stack.sso_session_name.encode()).hexdigest() + ".json")).write_text(json.dumps(entry))
    for key, value in sso_stack.env().items():
        monkeypatch.setenv(key, value)
    session = botocore.session.Session(profile=sso_stack.profile)
    provider = SSOTokenProvider(session, cache=JSONFileCache(str(cache)))
    frozen = provider.load_token().get_frozen_token()
    assert frozen.token not in ("stale", token["accessToken"])
    assert json.loads(next(cache.iterdir()).read_text())["accessToken"] == frozen.token


def test_moto_restart_reseeds_and_everything_follows(sso_stack):
    """Runs last on this module's stack: moto loses its state on restart and is seeded
    afresh (new keys, ids); the stack's description and the SSO stand-in follow."""
    old_key, old_instance = sso_stack.access_key_id, sso_stack.bastion_instance_id
    sso_stack.moto.restart()
    assert sso_stack.access_key_id != old_key and sso_stack.bastion_instance_id != old_instance
    creds = sso_stack.role_credentials()
    assert creds["aws_access_key_id"].startswith("ASIA")
    oidc, sso = clients(sso_stack)
    reg, auth = start_device_flow(oidc, sso_stack)
    sso_stack.sso.approve(auth["userCode"])
    token = poll_until_issued(oidc, reg, auth)
    assert sso.get_role_credentials(accessToken=token["accessToken"], accountId=sso_stack.account_id,
                                    roleName="db-developer")["roleCredentials"]["accessKeyId"]


# ------------------------------------------------------------------ timing rules (fake clock)

class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def make_state(**overrides) -> tuple[SsoState, Clock, dict, dict]:
    config = SsoConfig(listen_port=0, start_url="http://x/start", seed_file="/nonexistent",
                       accounts=[{"accountId": "1", "accountName": "a", "emailAddress": "e", "roles": ["r"]}],
                       **overrides)
    clock = Clock()
    state = SsoState(config, clock=clock)
    reg = state.register_client({"clientName": "t", "clientType": "public"})
    auth = state.start_device_authorization({**reg, "startUrl": config.start_url}, "http://x")
    return state, clock, reg, auth


def poll(state, reg, auth) -> dict:
    return state.create_token({**reg, "grantType": DEVICE_GRANT, "deviceCode": auth["deviceCode"]})


def error_of(fn) -> str:
    with pytest.raises(ApiError) as info:
        fn()
    return info.value.body.get("error") or info.value.code


def test_state_pending_until_approved_and_slow_down_between_polls():
    state, clock, reg, auth = make_state(interval=5)
    assert error_of(lambda: poll(state, reg, auth)) == "authorization_pending"
    clock.now += 4.9
    assert error_of(lambda: poll(state, reg, auth)) == "slow_down"
    clock.now += 5
    assert state.approve(auth["userCode"].lower())          # codes are case-insensitive
    assert poll(state, reg, auth)["accessToken"]
    clock.now += 5
    assert error_of(lambda: poll(state, reg, auth)) == "invalid_grant"   # a device code is used once


def test_state_device_code_expires():
    state, clock, reg, auth = make_state(device_code_ttl=60)
    state.approve(auth["userCode"])
    clock.now += 60
    assert error_of(lambda: poll(state, reg, auth)) == "expired_token"


def test_state_access_token_expires_and_refresh_rotates():
    state, clock, reg, auth = make_state(access_token_ttl=100)
    state.approve(auth["userCode"])
    token = poll(state, reg, auth)
    state.check_access_token(token["accessToken"])
    clock.now += 100
    assert error_of(lambda: state.check_access_token(token["accessToken"])) == "UnauthorizedException"
    fresh = state.create_token({**reg, "grantType": "refresh_token", "refreshToken": token["refreshToken"]})
    state.check_access_token(fresh["accessToken"])
    assert error_of(lambda: state.create_token(
        {**reg, "grantType": "refresh_token", "refreshToken": token["refreshToken"]})) == "invalid_grant"


def test_state_auto_approve():
    state, clock, reg, _ = make_state()
    state.auto_approve = True
    auth = state.start_device_authorization({**reg, "startUrl": "http://x/start"}, "http://x")
    assert poll(state, reg, auth)["accessToken"]
