"""AWS IAM Identity Center on the real stack (moto, OpenBao behind the aws-auth stand-in,
MariaDB, the strict SSO stand-in), on a private stack whose access tokens live seconds:

- the Identity Center region differs from the work region (sso_region us-east-1, aws.region
  eu-west-1): sign-in and role credentials go to sso_region;
- an expired access token with a valid refresh token is refreshed, not a "sign in"; "sign in"
  only when the session ends (refresh refused) or the registration expires;
- the browser sign-in (authorization code with PKCE, loopback redirect) and the device code
  fallback; client registrations reused from the AWS CLI's cache file.
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from pathlib import Path

import boto3
import pytest

from dbtunneld.adapters.aws import AwsSession, format_utc, parse_utc
from dbtunneld.adapters.keystore import Keystore
from dbtunneld.adapters.sso import SsoDeviceLogin, refresh_sso_token, registration_cache_key
from dbtunneld.core.config import AwsConfig, parse_config
from dbtunneld.core.errors import SignInNeededError
from dbtunneld.core.model import CredentialState
from dbtunneld.core.paths import Paths
from dbtunneld.core.timing import Backoff
from dbtunneld.engine.credentials import CredentialEngine
from dbtunneld.engine.keeper import Tuning
from dbtunneld.sandbox.guard import install_signal_guard
from dbtunneld.sandbox.stack import start_stack

S = CredentialState
ACCESS_TTL = 6


@pytest.fixture(scope="module")
def sso_stack():
    """Private: these tests end SSO sessions and expire registrations."""
    install_signal_guard()
    with start_stack(clusters=("orders",), ssh=False, ssm=False, sso_access_token_ttl=ACCESS_TTL,
                     sso_refresh_token_ttl=3600) as s:
        yield s


def wait_for(check, timeout: float, what: str, interval: float = 0.1):
    end = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def aws_session(stack, home: Path, region: str | None = None) -> AwsSession:
    config = parse_config(stack.daemon_config()).aws
    if region:
        config = AwsConfig(profile=config.profile, region=region, endpoint_urls=config.endpoint_urls)
    return AwsSession(config, home=home, config_file=Path(stack.aws_config_file))


def device_sign_in(stack, session: AwsSession) -> Path:
    flow = SsoDeviceLogin(session)
    auth = flow.start()
    assert stack.sso.approve(auth.user_code)
    interval, end = auth.interval, time.monotonic() + 30
    while time.monotonic() < end:
        time.sleep(interval)
        result = flow.poll(auth, interval)
        if result.done:
            return result.cache_file
        interval = result.interval
    raise AssertionError("device authorization never completed")


def engine_for(stack, session: AwsSession, base: Path, events: list) -> CredentialEngine:
    config = parse_config(stack.daemon_config())
    paths = Paths(base / "config.toml", base / "state", base / "log", base / "run").ensure()
    return CredentialEngine(config, paths, Keystore.memory(), aws=session, on_event=events.append,
                            tuning=Tuning(backoff=Backoff(0.2, 2.0), sign_in_recheck=1.0, failed_recheck=2.0))


def aws_states(events: list) -> list[CredentialState]:
    return [e.status.state for e in events if e.kind == "status" and e.status.kind == "aws"]


def portal_accepts(stack, cache_file: Path) -> bool:
    token = json.loads(cache_file.read_text())["accessToken"]
    portal = boto3.client("sso", endpoint_url=stack.portal_url(), region_name="us-east-1")
    try:
        portal.list_accounts(accessToken=token)
        return True
    except portal.exceptions.UnauthorizedException:
        return False


# ------------------------------------------------------------------ 1. sso_region != aws.region

@pytest.mark.parametrize("flow", ["device_code", "authorization_code"])
def test_sso_region_other_than_the_work_region_signs_in_and_gets_role_credentials(sso_stack, tmp_path, flow):
    """Identity Center in us-east-1, clusters in eu-west-1: OIDC and portal calls go to
    us-east-1 (the stand-in's eu-west-1 endpoints know neither the start URL nor its tokens)."""
    session = aws_session(sso_stack, tmp_path, region="eu-west-1")
    assert session.sso_settings().region == "us-east-1"
    if flow == "device_code":
        device_sign_in(sso_stack, session)
    else:
        browser_sign_in(sso_stack, session)
    creds = session.credentials()
    assert creds.method == "sso" and creds.access_key.startswith("ASIA")
    assert session.caller_arn().endswith(":assumed-role/db-developer/alice@example.com")


# ------------------------------------------------------------------ 5. no hourly false sign-in

def test_expired_access_token_is_refreshed_not_a_sign_in_until_the_session_ends(sso_stack, tmp_path):
    home = tmp_path / "home"
    session = aws_session(sso_stack, home)
    cache_file = device_sign_in(sso_stack, session)
    first = json.loads(cache_file.read_text())
    events: list = []
    engine = engine_for(sso_stack, session, tmp_path / "engine", events)
    try:
        engine.start()
        engine.want("orders", timeout=20)
        time.sleep(3 * ACCESS_TTL)                       # three access-token lifetimes pass
        assert engine.aws_status().state == S.VALID
        assert S.NEEDS_SIGN_IN not in aws_states(events)
        now = json.loads(cache_file.read_text())
        assert now["accessToken"] != first["accessToken"] and now["refreshToken"] != first["refreshToken"]
        assert parse_utc(now["expiresAt"]) > time.time()
        assert portal_accepts(sso_stack, cache_file)      # the refreshed token is a real one
        assert engine.aws_status().expires_at is None     # refreshable: its end is not known
        sso_stack.sso.end_sessions()                      # the SSO session ends on the AWS side
        wait_for(lambda: engine.aws_status().state == S.NEEDS_SIGN_IN, 4 * ACCESS_TTL, "sign-in needed")
        time.sleep(2)
        assert aws_states(events).count(S.NEEDS_SIGN_IN) == 1     # said once
        assert "dbtunneld login" in SignInNeededError("x").hint
    finally:
        engine.stop(revoke=True, timeout=5)


def test_expired_registration_means_sign_in_and_the_next_sign_in_registers_anew(sso_stack, tmp_path):
    session = aws_session(sso_stack, tmp_path)
    cache_file = device_sign_in(sso_stack, session)
    reg_file = session.cache_dir / f"{registration_cache_key(session.sso_settings())}.json"
    old_client = json.loads(reg_file.read_text())["clientId"]
    entry = json.loads(cache_file.read_text())
    entry["expiresAt"] = format_utc(time.time() - 5)      # the access token's hour is over
    session.write_sso_token(session.sso_settings(), entry)
    assert refresh_sso_token(session) > time.time()       # refreshed
    sso_stack.sso.expire_registrations()                  # clientSecretExpiresAt passes at AWS
    entry = json.loads(cache_file.read_text())
    entry["expiresAt"] = format_utc(time.time() - 5)
    session.write_sso_token(session.sso_settings(), entry)
    with pytest.raises(SignInNeededError, match="InvalidClientException"):
        refresh_sso_token(session)
    before = sso_stack.sso.state()["registrations"]
    device_sign_in(sso_stack, session)
    assert sso_stack.sso.state()["registrations"] == before + 1
    assert json.loads(reg_file.read_text())["clientId"] != old_client
    assert portal_accepts(sso_stack, cache_file)


def test_legacy_profile_cannot_refresh_and_needs_a_sign_in_when_its_token_expires(sso_stack, tmp_path):
    text = Path(sso_stack.aws_config_file).read_text()
    config_file = tmp_path / "aws-config"
    config_file.write_text(text + f"\n[profile legacy]\nsso_start_url = {sso_stack.sso_start_url}\n"
                                  f"sso_region = us-east-1\nsso_account_id = {sso_stack.account_id}\n"
                                  "sso_role_name = db-developer\nservices = sandbox-endpoints\n")
    base = parse_config(sso_stack.daemon_config()).aws
    session = AwsSession(AwsConfig(profile="legacy", region=base.region, endpoint_urls=base.endpoint_urls),
                         home=tmp_path, config_file=config_file)
    device_sign_in(sso_stack, session)
    assert session.credentials().method == "sso"
    entry = session.cached_sso_token()
    entry["expiresAt"] = format_utc(time.time() - 5)
    session.write_sso_token(session.sso_settings(), entry)
    with pytest.raises(SignInNeededError, match="legacy"):
        refresh_sso_token(session)


# ------------------------------------------------------------------ 6. browser sign-in (PKCE)

def follow_browser(stack, url: str, allow: bool = True) -> int:
    """What the user's browser does: open the sign-in page, press Allow, follow the redirect to
    the loopback listener. Returns the listener's HTTP status."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        page = resp.read().decode()
    action = page.split('action="', 1)[1].split('"', 1)[0]
    request_id = page.split('name="request" value="', 1)[1].split('"', 1)[0]
    form = urllib.parse.urlencode({"request": request_id, "allow": "1" if allow else "0"}).encode()
    with urllib.request.urlopen(stack.sso_endpoint + action, data=form, timeout=10) as resp:
        assert resp.url.startswith("http://127.0.0.1:") and "/oauth/callback?" in resp.url
        return resp.status


def browser_sign_in(stack, session: AwsSession) -> None:
    from dbtunneld.adapters.sso import SsoAuthCodeLogin
    import threading

    flow = SsoAuthCodeLogin(session, timeout=20)
    info = flow.start()
    opened = threading.Thread(target=follow_browser, args=(stack, info["verification_uri_complete"]))
    opened.start()
    try:
        flow.finish(threading.Event())
    finally:
        opened.join(10)


def test_tray_sign_in_uses_the_browser_with_pkce_and_reuses_the_cli_registration(sso_stack, tmp_path, caplog):
    caplog.set_level("INFO", logger="dbtunneld")
    session = aws_session(sso_stack, tmp_path / "home")
    sso = session.sso_settings()
    events: list = []
    engine = engine_for(sso_stack, session, tmp_path / "engine", events)
    statuses: list[int] = []
    try:
        engine.start()
        before = sso_stack.sso.state()["registrations"]
        info = engine.sso_login(open_browser=lambda url: statuses.append(follow_browser(sso_stack, url)))
        assert info["flow"] == "authorization_code" and not info["user_code"]
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(info["verification_uri"]).query))
        assert query["code_challenge_method"] == "S256" and query["redirect_uri"].startswith("http://127.0.0.1:")
        wait_for(lambda: any(e.kind == "sso.signed_in" for e in events), 20, "the sign-in event")
        assert statuses == [200]
        engine.want("orders", timeout=20)
        reg = json.loads((session.cache_dir / f"{registration_cache_key(sso)}.json").read_text())
        assert "authorization_code" in reg["grantTypes"] and reg["clientId"]
        token = json.loads((session.cache_dir / f"{sso.cache_key}.json").read_text())
        assert token["clientId"] == reg["clientId"] and token["refreshToken"]
        engine.sso_login(open_browser=lambda url: statuses.append(follow_browser(sso_stack, url)))
        wait_for(lambda: sum(e.kind == "sso.signed_in" for e in events) == 2, 20, "the second sign-in")
        assert sso_stack.sso.state()["registrations"] == before + 1      # registered once, then reused
        token = json.loads((session.cache_dir / f"{sso.cache_key}.json").read_text())
        logged = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("dbtunneld"))
        assert "SSO sign-in started (authorization_code)" in logged
        for secret in (token["accessToken"], token["refreshToken"], token["clientSecret"], reg["clientSecret"]):
            assert secret not in logged
    finally:
        engine.stop(revoke=True, timeout=5)


def test_device_code_on_request_and_a_denied_browser_sign_in_fails_cleanly(sso_stack, tmp_path):
    session = aws_session(sso_stack, tmp_path / "home")
    events: list = []
    engine = engine_for(sso_stack, session, tmp_path / "engine", events)
    try:
        info = engine.sso_login(open_browser=lambda url: follow_browser(sso_stack, url, allow=False))
        assert info["flow"] == "authorization_code"
        wait_for(lambda: any(e.kind == "sso.failed" for e in events), 20, "the failure event")
        info = engine.sso_login(use_device_code=True)
        assert info["flow"] == "device_code" and info["user_code"]
        assert sso_stack.sso.approve(info["user_code"])
        wait_for(lambda: any(e.kind == "sso.signed_in" for e in events), 20, "the sign-in event")
    finally:
        engine.stop(revoke=True, timeout=5)


# ------------------------------------------------------------------ the keeper's schedule (pure)

@pytest.mark.parametrize("left", [3600.0, 901.0, 900.0, 300.0, 6.0, 1.0, 0.0])
def test_next_check_opens_the_refresh_window_or_halves_what_is_left(left):
    from dbtunneld.engine.sso_keeper import MIN_CHECK, next_check

    now = 1000.0
    at = next_check(now + left, now)
    assert at > now
    if left > 900:
        assert at == now + left - 900            # when botocore's 15-minute window opens
    else:
        assert at == now + max(MIN_CHECK, left / 2)
