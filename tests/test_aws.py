"""AwsSession against a real moto server with SigV4/IAM enforcement (static, assume-role and
environment credentials, endpoint overrides, refused signatures), the SSO error mapping on the
real botocore providers, and the classification table."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import sys
import time
from pathlib import Path

import botocore.exceptions as bexc
import pytest

from dbtunneld.adapters import aws, sso
from dbtunneld.core.config import AwsConfig
from dbtunneld.core.errors import NeedsUserError, PermissionDeniedError, SignInNeededError, TransientError
from dbtunneld.sandbox.procs import Service, file_probe, free_port


@pytest.fixture(scope="module")
def moto(tmp_path_factory):
    """A moto server seeded with a user who may assume db-developer; enforcement switched on."""
    base = tmp_path_factory.mktemp("moto")
    port = free_port()
    seed_file = base / "seed.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(HOME=str(base), MOTO_EC2_LOAD_DEFAULT_AMIS="false")
    svc = Service(name="moto", argv=[sys.executable, "-m", "dbtunneld.sandbox.moto_launcher", "--port", str(port),
                                     "--seed-out", str(seed_file)],
                  log_path=base / "moto.log", env=env, ready=file_probe(seed_file), start_timeout=60, port=port)
    svc.start()
    try:
        yield json.loads(seed_file.read_text())
    finally:
        svc.stop()


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A private HOME with an empty ~/.aws; no AWS_* variables from the outside."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / ".aws").mkdir()
    return tmp_path


def write_aws_files(home: Path, config: str = "", credentials: str = "") -> None:
    (home / ".aws" / "config").write_text(config)
    (home / ".aws" / "credentials").write_text(credentials)


def user_keys(seed) -> str:
    u = seed["user"]
    return f"[dev-user]\naws_access_key_id = {u['access_key_id']}\naws_secret_access_key = {u['secret_access_key']}\n"


def session(home, profile, seed=None, **endpoints) -> aws.AwsSession:
    urls = {"sts": seed["endpoint"]} if seed else {}
    urls.update(endpoints)
    return aws.AwsSession(AwsConfig(profile=profile, region="us-east-1", endpoint_urls=urls), home=home)


def test_static_profile_credentials_and_identity(moto, home):
    write_aws_files(home, credentials=user_keys(moto))
    s = session(home, "dev-user", moto)
    creds = s.credentials()
    assert creds.access_key == moto["user"]["access_key_id"]
    assert creds.expires_at is None
    assert moto["user"]["secret_access_key"] not in repr(creds)
    assert s.caller_arn() == moto["user"]["arn"]


def test_assume_role_profile_has_an_expiry_and_the_role_identity(moto, home):
    write_aws_files(home, credentials=user_keys(moto), config=(
        f"[profile dev]\nrole_arn = {moto['roles']['db-developer']}\nsource_profile = dev-user\n"))
    s = session(home, "dev", moto)
    creds = s.credentials()
    assert creds.expires_at is not None and creds.expires_at > time.time() + 600
    assert ":assumed-role/db-developer/" in s.caller_arn()


def test_environment_credentials_without_a_profile(moto, home, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto["user"]["access_key_id"])
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto["user"]["secret_access_key"])
    write_aws_files(home)
    s = session(home, "", moto)
    assert s.credentials().method == "env"
    assert s.caller_arn() == moto["user"]["arn"]


def test_wrong_secret_is_refused_by_enforcing_moto(moto, home):
    u = moto["user"]
    write_aws_files(home, credentials=f"[bad]\naws_access_key_id = {u['access_key_id']}\naws_secret_access_key = wrong{u['secret_access_key'][5:]}\n")
    with pytest.raises(PermissionDeniedError, match="SignatureDoesNotMatch"):
        session(home, "bad", moto).caller_arn()


def test_endpoint_overrides_reach_every_client_including_boto3(moto, home):
    write_aws_files(home, credentials=user_keys(moto), config=(
        f"[profile dev]\nrole_arn = {moto['roles']['db-developer']}\nsource_profile = dev-user\n"))
    s = session(home, "dev", moto, ec2=moto["endpoint"], rds="http://127.0.0.1:9/")
    assert s.client("ec2").meta.endpoint_url == moto["endpoint"]
    assert s.boto3().client("rds").meta.endpoint_url == "http://127.0.0.1:9/"
    assert s.client("ssm").meta.endpoint_url.startswith("https://ssm.us-east-1.amazonaws")
    tags = {"Name": "dbtunneld-bastion"}
    found = s.boto3().client("ec2").describe_instances(
        Filters=[{"Name": f"tag:{k}", "Values": [v]} for k, v in tags.items()])
    assert found["Reservations"][0]["Instances"][0]["InstanceId"] == moto["bastion_instance_id"]


def test_unreachable_endpoint_is_transient(home):
    port = free_port()
    write_aws_files(home, credentials="[k]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = x\n")
    s = aws.AwsSession(AwsConfig(profile="k", endpoint_urls={"sts": f"http://127.0.0.1:{port}"}), home=home)
    with pytest.raises(TransientError, match="unreachable"):
        s.caller_arn()


def test_missing_profile_needs_the_user(home):
    write_aws_files(home)
    with pytest.raises(NeedsUserError, match="'nope' is not in your AWS config"):
        session(home, "nope").credentials()


def test_mfa_profile_never_prompts(moto, home):
    write_aws_files(home, credentials=user_keys(moto), config=(
        f"[profile mfa]\nrole_arn = {moto['roles']['db-developer']}\nsource_profile = dev-user\n"
        "mfa_serial = arn:aws:iam::123456789012:mfa/dev-alice\n"))
    with pytest.raises(NeedsUserError, match="MFA"):
        session(home, "mfa", moto).credentials()


# ------------------------------------------------------------------------------------------
# SSO profiles: settings, cache naming, and sign-in-needed mapping from botocore's own providers

SSO_SESSION_CONFIG = """
[profile dev-sso]
sso_session = corp
sso_account_id = 123456789012
sso_role_name = db-developer

[sso-session corp]
sso_start_url = https://corp.awsapps.example/start
sso_region = us-east-1
sso_registration_scopes = sso:account:access

[profile dev-legacy]
sso_start_url = https://legacy.awsapps.example/start
sso_region = eu-west-1
sso_account_id = 123456789012
sso_role_name = db-developer
"""


def test_sso_settings_and_cli_cache_names(home):
    write_aws_files(home, config=SSO_SESSION_CONFIG)
    new = session(home, "dev-sso").sso_settings()
    assert new.session_name == "corp" and new.scopes == ("sso:account:access",)
    assert new.cache_key == hashlib.sha1(b"corp").hexdigest()
    old = session(home, "dev-legacy").sso_settings()
    assert old.session_name is None and old.region == "eu-west-1"
    assert old.cache_key == hashlib.sha1(b"https://legacy.awsapps.example/start").hexdigest()
    write_aws_files(home, credentials="[k]\naws_access_key_id = A\naws_secret_access_key = B\n")
    assert session(home, "k").sso_settings() is None


@pytest.mark.parametrize("profile", ["dev-sso", "dev-legacy"])
def test_no_cached_sso_token_means_sign_in_needed(home, profile):
    write_aws_files(home, config=SSO_SESSION_CONFIG)
    with pytest.raises(SignInNeededError) as exc:
        session(home, profile).credentials()
    assert "dbtunneld login" in exc.value.hint


@pytest.mark.parametrize("profile", ["dev-sso", "dev-legacy"])
def test_expired_cached_sso_token_means_sign_in_needed(home, profile):
    write_aws_files(home, config=SSO_SESSION_CONFIG)
    s = session(home, profile)
    sso = s.sso_settings()
    past = time.time() - 60
    path = s.write_sso_token(sso, {"startUrl": sso.start_url, "region": sso.region, "accessToken": "expired-token-value",
                                   "expiresAt": aws.format_utc(past)})
    assert path == home / ".aws" / "sso" / "cache" / f"{sso.cache_key}.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert s.sso_expires_at() == pytest.approx(past, abs=1)
    with pytest.raises(SignInNeededError):
        s.credentials()


def test_device_login_refuses_non_sso_profiles(home):
    write_aws_files(home, credentials="[k]\naws_access_key_id = A\naws_secret_access_key = B\n")
    with pytest.raises(NeedsUserError, match="does not use SSO"):
        sso.SsoDeviceLogin(session(home, "k"))


def test_legacy_profile_without_sso_region_is_a_config_error(home):
    write_aws_files(home, config="[profile old]\nsso_start_url = https://x.awsapps.example/start\n")
    with pytest.raises(NeedsUserError, match="no sso_region"):
        session(home, "old").sso_settings()


def test_registration_cache_file_is_the_aws_clis(home):
    """awscli/botocore/utils.py BaseSSOTokenFetcher._registration_cache_key: sha1 of the sorted
    JSON of tool, startUrl, region, scopes (None when unset) and session_name."""
    write_aws_files(home, config=SSO_SESSION_CONFIG)
    new = session(home, "dev-sso").sso_settings()
    args = {"tool": "botocore", "startUrl": new.start_url, "region": "us-east-1",
            "scopes": ["sso:account:access"], "session_name": "corp"}
    assert sso.registration_cache_key(new) == hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()
    old = session(home, "dev-legacy").sso_settings()
    args = {"tool": "botocore", "startUrl": old.start_url, "region": "eu-west-1", "scopes": None, "session_name": None}
    assert sso.registration_cache_key(old) == hashlib.sha1(json.dumps(args, sort_keys=True).encode()).hexdigest()


def test_pkce_pair_is_s256():
    verifier, challenge = sso.pkce_pair()
    assert 43 <= len(verifier) <= 128 and "=" not in challenge
    import base64
    digest = base64.urlsafe_b64decode(challenge + "=")
    assert digest == hashlib.sha256(verifier.encode()).digest()


def test_endpoint_urls_take_the_region_of_each_client(home):
    write_aws_files(home, credentials="[k]\naws_access_key_id = A\naws_secret_access_key = B\n")
    s = aws.AwsSession(AwsConfig(profile="k", region="eu-west-1",
                                 endpoint_urls={"sso-oidc": "http://127.0.0.1:9/oidc.{region}"}), home=home)
    assert s.client("sso-oidc").meta.endpoint_url == "http://127.0.0.1:9/oidc.eu-west-1"
    assert s.client("sso-oidc", region="us-east-1").meta.endpoint_url == "http://127.0.0.1:9/oidc.us-east-1"


def _client_error(code: str, status: int = 400) -> bexc.ClientError:
    return bexc.ClientError({"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "Op")


@pytest.mark.parametrize("exc, kind", [
    (bexc.SSOTokenLoadError(error_msg="no token"), SignInNeededError),
    (bexc.UnauthorizedSSOTokenError(), SignInNeededError),
    (bexc.TokenRetrievalError(provider="sso", error_msg="expired"), SignInNeededError),
    (_client_error("UnauthorizedException", 401), SignInNeededError),
    (_client_error("ExpiredToken"), SignInNeededError),
    (_client_error("AccessDenied", 403), PermissionDeniedError),
    (_client_error("InvalidClientTokenId", 403), PermissionDeniedError),
    (_client_error("Throttling"), TransientError),
    (_client_error("Whatever", 503), TransientError),
    (bexc.EndpointConnectionError(endpoint_url="http://x"), TransientError),
    (bexc.ProfileNotFound(profile="p"), NeedsUserError),
    (bexc.NoCredentialsError(), NeedsUserError),
])
def test_classification_table(exc, kind):
    got = aws.classify(exc, "doing it", "p")
    assert type(got) is kind
    assert got.hint
