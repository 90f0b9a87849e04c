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


# ------------------------------------------------------------------ regions (over the wire)

def test_each_region_is_its_own_endpoint_and_the_wrong_one_fails_as_on_aws(sso_stack):
    """The instance lives in us-east-1: eu-west-1's OIDC registers clients (registration is
    regional) but knows neither the start URL nor us-east-1's clients, and its portal refuses
    us-east-1's tokens."""
    oidc, sso = clients(sso_stack)
    reg, auth = start_device_flow(oidc, sso_stack)
    sso_stack.sso.approve(auth["userCode"])
    token = poll_until_issued(oidc, reg, auth)
    eu_oidc, eu_sso = clients(sso_stack, "eu-west-1")
    eu_reg = eu_oidc.register_client(clientName="t", clientType="public")
    with pytest.raises(eu_oidc.exceptions.InvalidRequestException):
        eu_oidc.start_device_authorization(clientId=eu_reg["clientId"], clientSecret=eu_reg["clientSecret"],
                                           startUrl=sso_stack.sso_start_url)
    with pytest.raises(eu_oidc.exceptions.InvalidRequestRegionException):
        eu_oidc.create_token(clientId=reg["clientId"], clientSecret=reg["clientSecret"],
                             grantType="refresh_token", refreshToken=token["refreshToken"])
    with pytest.raises(eu_sso.exceptions.UnauthorizedException):
        eu_sso.list_accounts(accessToken=token["accessToken"])
    assert sso.list_accounts(accessToken=token["accessToken"])["accountList"]
    root = boto3.client("sso-oidc", endpoint_url=sso_stack.sso_endpoint, region_name="us-east-1")
    with pytest.raises(root.exceptions.ClientError) as no_host:      # no region, no endpoint
        root.register_client(clientName="t", clientType="public")
    assert no_host.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


# ------------------------------------------------------------------ PKCE (over the wire)

def pkce() -> tuple[str, str]:
    import base64
    import secrets

    verifier = secrets.token_urlsafe(48)
    return verifier, base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")


def register_for_auth_code(oidc, stack) -> dict:
    return oidc.register_client(clientName="t", clientType="public", grantTypes=["authorization_code", "refresh_token"],
                                redirectUris=["http://127.0.0.1/oauth/callback"], issuerUrl=stack.sso_start_url,
                                scopes=["sso:account:access"])


class NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args, **kwargs):
        return None


def authorize(stack, reg, redirect_uri: str, challenge: str, state: str = "st-1") -> tuple[int, str]:
    """The browser: /authorize, then Allow on the consent form; (status, Location)."""
    from urllib.parse import urlencode

    query = urlencode({"response_type": "code", "client_id": reg["clientId"], "redirect_uri": redirect_uri,
                       "state": state, "code_challenge_method": "S256", "scopes": "sso:account:access",
                       "code_challenge": challenge})
    try:
        with urllib.request.urlopen(f"{stack.oidc_url()}/authorize?{query}", timeout=10) as resp:
            page = resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, ""
    request_id = page.split('name="request" value="', 1)[1].split('"', 1)[0]
    opener = urllib.request.build_opener(NoRedirect)
    data = urlencode({"request": request_id, "allow": "1"}).encode()
    try:
        opener.open(f"{stack.oidc_url()}/authorize/consent", data=data, timeout=10)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Location", "")
    raise AssertionError("no redirect")


def test_pkce_authorization_code_grant(sso_stack):
    from urllib.parse import parse_qs, urlsplit

    oidc, sso = clients(sso_stack)
    reg = register_for_auth_code(oidc, sso_stack)
    verifier, challenge = pkce()
    redirect = "http://127.0.0.1:43123/oauth/callback"              # any port (RFC 8252 7.3)
    status, location = authorize(sso_stack, reg, redirect, challenge)
    assert status == 302 and location.startswith(redirect + "?")
    query = {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}
    assert query["state"] == "st-1"
    exchange = dict(clientId=reg["clientId"], clientSecret=reg["clientSecret"], grantType="authorization_code",
                    redirectUri=redirect, code=query["code"])
    with pytest.raises(oidc.exceptions.InvalidGrantException):        # wrong verifier: and the code is spent
        oidc.create_token(codeVerifier=pkce()[0], **exchange)
    with pytest.raises(oidc.exceptions.InvalidGrantException):
        oidc.create_token(codeVerifier=verifier, **exchange)
    status, location = authorize(sso_stack, reg, redirect, challenge)
    code = parse_qs(urlsplit(location).query)["code"][0]
    with pytest.raises(oidc.exceptions.InvalidGrantException):        # redirect URI differs from /authorize
        oidc.create_token(codeVerifier=verifier, **{**exchange, "code": code,
                                                    "redirectUri": "http://127.0.0.1:1/oauth/callback"})
    status, location = authorize(sso_stack, reg, redirect, challenge)
    code = parse_qs(urlsplit(location).query)["code"][0]
    token = oidc.create_token(codeVerifier=verifier, **{**exchange, "code": code})
    assert token["refreshToken"] and sso.list_accounts(accessToken=token["accessToken"])["accountList"]
    with pytest.raises(oidc.exceptions.InvalidGrantException):        # single use
        oidc.create_token(codeVerifier=verifier, **{**exchange, "code": code})
    assert authorize(sso_stack, reg, "http://evil.example/oauth/callback", challenge)[0] == 400
    assert authorize(sso_stack, reg, "http://127.0.0.1:43123/other", challenge)[0] == 400
    device_reg, _ = start_device_flow(oidc, sso_stack)
    assert authorize(sso_stack, device_reg, redirect, challenge)[0] == 400   # not registered for codes
    with pytest.raises(oidc.exceptions.InvalidRedirectUriException):
        oidc.register_client(clientName="t", clientType="public", grantTypes=["authorization_code"],
                             redirectUris=["https://example.com/cb"], issuerUrl=sso_stack.sso_start_url)


def test_state_refresh_tokens_end_with_the_session_and_rotation_does_not_extend_it():
    state, clock, reg, auth = make_state(access_token_ttl=3600, refresh_token_ttl=8 * 3600)
    state.approve(auth["userCode"])
    token = poll(state, reg, auth)
    for _ in range(7):                                       # refreshed every hour
        clock.now += 3600
        token = state.create_token({**reg, "grantType": "refresh_token", "refreshToken": token["refreshToken"]})
    clock.now += 3600                                        # 8 h: the session is over
    assert error_of(lambda: state.create_token(
        {**reg, "grantType": "refresh_token", "refreshToken": token["refreshToken"]})) == "invalid_grant"


def test_state_expired_registration_is_invalid_client():
    state, clock, reg, auth = make_state(registration_ttl=1000)
    state.approve(auth["userCode"])
    token = poll(state, reg, auth)
    clock.now += 1000
    assert error_of(lambda: state.create_token(
        {**reg, "grantType": "refresh_token", "refreshToken": token["refreshToken"]})) == "invalid_client"
    assert error_of(lambda: state.start_device_authorization({**reg, "startUrl": "http://x/start"}, "http://x")) \
        == "invalid_client"


def test_state_authorization_code_expires_and_grant_types_are_enforced():
    import base64

    state, clock, _, _ = make_state(auth_code_ttl=60)
    reg = state.register_client({"clientName": "t", "clientType": "public",
                                 "grantTypes": ["authorization_code", "refresh_token"],
                                 "redirectUris": ["http://127.0.0.1/oauth/callback"], "issuerUrl": "http://x/start"})
    verifier = "v" * 64
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    query = {"response_type": "code", "client_id": reg["clientId"], "redirect_uri": "http://127.0.0.1:5/oauth/callback",
             "state": "s", "code_challenge_method": "S256", "code_challenge": challenge}
    code = state.consent(state.authorize(query, "us-east-1"), True).split("code=")[1].split("&")[0]
    clock.now += 60
    body = {**reg, "grantType": "authorization_code", "code": code, "codeVerifier": verifier,
            "redirectUri": query["redirect_uri"]}
    assert error_of(lambda: state.create_token(body)) == "invalid_grant"
    assert error_of(lambda: state.create_token({**reg, "grantType": DEVICE_GRANT, "deviceCode": "x"})) \
        == "unauthorized_client"
    assert error_of(lambda: state.authorize({**query, "code_challenge_method": "plain"}, "us-east-1")) == "invalid_request"
