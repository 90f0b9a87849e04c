"""AWS through boto3/botocore: a session from a named profile, and the built-in SSO sign-in.

``AwsSession`` resolves credentials the way the AWS CLI does (SSO profiles in both the
``sso_session`` and the legacy form, assume-role, static, environment), applies the endpoint
overrides of ``config.aws.endpoint_urls`` to every client botocore creates (including the ones
the SSO provider creates internally), and reports when the credentials expire. The SSO token
cache is the AWS CLI v2 one (``~/.aws/sso/cache/<sha1(session name or start url)>.json``), so
``aws`` and dbtunneld share one sign-in.

``SsoDeviceLogin`` is the OIDC device-authorization flow (register the client, start the
authorization, poll ``CreateToken`` honouring ``slow_down`` and expiry) and writes that cache.
It polls once per call; the caller's loop owns the pacing.

``classify`` is the one place that turns botocore failures into dbtunneld errors; an expired or
missing SSO session always becomes ``SignInNeededError``.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import boto3
import botocore.exceptions as bexc
import botocore.session
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig
from botocore.credentials import (
    AssumeRoleProvider,
    ProfileProviderBuilder,
    SSOProvider,
    create_credential_resolver,
)
from botocore.tokens import SSOTokenProvider
from botocore.utils import JSONFileCache

from . import log as dlog
from .config import AwsConfig
from .errors import DbtunneldError, NeedsUserError, PermissionDeniedError, SignInNeededError, TransientError, reraise_if_bug
from .timing import SYSTEM_CLOCK, Clock

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
DEFAULT_SCOPES = ("sso:account:access",)
CLIENT_NAME = "dbtunneld"
SLOW_DOWN_STEP = 5.0
_SIGN_IN_CODES = {"UnauthorizedException", "UnauthorizedClientException", "InvalidGrantException",
                  "ExpiredTokenException"}
_DENIED_CODES = {"AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "SignatureDoesNotMatch",
                 "UnrecognizedClientException", "ForbiddenException"}
_TRANSIENT_CODES = {"Throttling", "ThrottlingException", "TooManyRequestsException", "RequestTimeout",
                    "RequestTimeoutException", "ServiceUnavailable", "ServiceUnavailableException",
                    "InternalError", "InternalFailure", "InternalServerException", "SlowDown"}


# ---------------------------------------------------------------------------------------------
# Error classification


def _sign_in(profile: str, why: str) -> SignInNeededError:
    return SignInNeededError(f"AWS SSO sign-in needed for profile {profile!r}: {why}")


def classify(exc: BaseException, doing: str, profile: str) -> DbtunneldError:
    """The dbtunneld error for a botocore failure while ``doing`` with ``profile``; a bug
    (``errors.is_bug``) is not classified but raised as it is."""
    if isinstance(exc, DbtunneldError):
        return exc
    reraise_if_bug(exc)
    if isinstance(exc, (bexc.SSOTokenLoadError, bexc.UnauthorizedSSOTokenError)):
        return _sign_in(profile, "the SSO session is missing or expired")
    if isinstance(exc, bexc.TokenRetrievalError):
        return _sign_in(profile, "the SSO session expired and could not be refreshed")
    if isinstance(exc, bexc.SSOError):
        return _sign_in(profile, str(exc))
    if isinstance(exc, bexc.ProfileNotFound):
        return NeedsUserError(f"AWS profile {profile!r} is not in your AWS config",
                              hint="set aws.profile to a profile of ~/.aws/config (e.g. one made by `aws configure sso`)")
    if isinstance(exc, (bexc.NoCredentialsError, bexc.PartialCredentialsError, bexc.InvalidConfigError,
                        bexc.CredentialRetrievalError, bexc.RefreshWithMFAUnsupportedError)):
        return NeedsUserError(f"no usable AWS credentials for profile {profile!r} while {doing}: {exc}",
                              hint="check the profile in ~/.aws/config (sso_session / role_arn / keys)")
    if isinstance(exc, (bexc.EndpointConnectionError, bexc.ConnectTimeoutError, bexc.ReadTimeoutError,
                        bexc.ConnectionClosedError, bexc.HTTPClientError, bexc.ConnectionError)):
        return TransientError(f"AWS is unreachable while {doing} ({type(exc).__name__})",
                              hint="check the network or VPN; dbtunneld keeps retrying")
    if isinstance(exc, bexc.ClientError):
        return _classify_client_error(exc, doing, profile)
    return TransientError(f"unexpected AWS failure while {doing}: {type(exc).__name__}: {exc}")


def _classify_client_error(exc: bexc.ClientError, doing: str, profile: str) -> DbtunneldError:
    error = exc.response.get("Error", {})
    code, message = error.get("Code", ""), error.get("Message", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code in _SIGN_IN_CODES or code in ("ExpiredToken", "RequestExpired"):
        return _sign_in(profile, f"{code} while {doing}")
    if code in _DENIED_CODES:
        return PermissionDeniedError(f"AWS refused {doing}: {code}: {message}",
                                     hint=f"check the permissions of the role of profile {profile!r}")
    if code in _TRANSIENT_CODES or status >= 500 or status == 429:
        return TransientError(f"AWS failed while {doing}: {code}: {message}",
                              hint="AWS is throttling or failing; dbtunneld keeps retrying")
    return DbtunneldError(f"AWS rejected {doing}: {code}: {message}",
                          hint=f"check the AWS profile {profile!r} and config.aws")


# ---------------------------------------------------------------------------------------------
# Session


@dataclass(frozen=True)
class AwsCredentials:
    """Frozen AWS credentials (secrets hidden from repr); ``expires_at`` is None for static keys."""

    access_key: str
    secret_key: str = field(repr=False)
    token: str | None = field(default=None, repr=False)
    expires_at: float | None = None
    method: str = ""


@dataclass(frozen=True)
class SsoSettings:
    """The SSO part of a profile."""

    start_url: str
    region: str
    session_name: str | None = None        # None: legacy profile (sso_start_url in the profile)
    account_id: str = ""
    role_name: str = ""
    scopes: tuple[str, ...] = ()

    @property
    def cache_key(self) -> str:
        """The AWS CLI v2 cache file name (without .json)."""
        return hashlib.sha1((self.session_name or self.start_url).encode("utf-8")).hexdigest()


def sso_cache_dir(home: Path | None = None) -> Path:
    return Path(home or Path.home()) / ".aws" / "sso" / "cache"


def _json_dumps(obj: Any) -> str:
    def default(value: Any) -> str:
        if isinstance(value, datetime):
            return format_utc(value.timestamp())
        raise TypeError(f"cannot serialise {type(value).__name__}")

    return json.dumps(obj, default=default)


def format_utc(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_utc(text: str) -> float | None:
    try:
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except (AttributeError, ValueError):
        return None


class _EndpointSession(botocore.session.Session):
    """A botocore session that applies endpoint overrides to every client it creates."""

    def __init__(self, endpoints: Mapping[str, str], profile: str | None) -> None:
        super().__init__(profile=profile or None)
        self._endpoint_overrides = dict(endpoints)

    def create_client(self, service_name, *args, **kwargs):
        url = self._endpoint_overrides.get(service_name)
        if url and len(args) < 5 and kwargs.get("endpoint_url") is None:
            kwargs["endpoint_url"] = url
        return super().create_client(service_name, *args, **kwargs)


def _no_prompt(prompt: str = "") -> str:
    raise NeedsUserError("this AWS profile asks for an MFA code, which a background daemon cannot prompt for",
                         hint="use an SSO profile, or run `aws sts get-session-token` and point aws.profile at the result")


def _build_session(config: AwsConfig, cache_dir: Path, config_file: Path | None = None) -> _EndpointSession:
    """A botocore session whose SSO providers read and write ``cache_dir``."""
    session = _EndpointSession(config.endpoint_urls, config.profile)
    if config_file is not None:
        session.set_config_variable("config_file", str(config_file))
    session.set_config_variable("region", config.region)
    profile = config.profile or "default"
    token_cache = JSONFileCache(str(cache_dir), dumps_func=_json_dumps)
    resolver = create_credential_resolver(session, region_name=config.region)
    builder = ProfileProviderBuilder(session, region_name=config.region, sso_token_cache=token_cache)
    for i, provider in enumerate(resolver.providers):
        if isinstance(provider, SSOProvider):
            resolver.providers[i] = SSOProvider(
                load_config=lambda: session.full_config, client_creator=session.create_client,
                profile_name=profile, cache={}, token_cache=token_cache,
                token_provider=SSOTokenProvider(session, cache=token_cache, profile_name=profile))
        elif isinstance(provider, AssumeRoleProvider):
            # SSO source profiles use our cache too, and a daemon never prompts for an MFA code.
            if hasattr(provider, "_profile_provider_builder"):
                provider._profile_provider_builder = builder
            if hasattr(provider, "_prompter"):
                provider._prompter = _no_prompt
    session.register_component("credential_provider", resolver)
    return session


def _register_sso_secrets(entry: Any) -> None:
    if isinstance(entry, dict):
        for key in ("accessToken", "refreshToken", "clientSecret"):
            value = entry.get(key)
            dlog.register_secret(value if isinstance(value, str) else None)


class AwsSession:
    """The developer's AWS identity from ``config.aws`` (thread-safe)."""

    def __init__(self, config: AwsConfig, *, home: Path | None = None, config_file: Path | None = None,
                 clock: Clock = SYSTEM_CLOCK) -> None:
        """``home``: where ``.aws/sso/cache`` is (default: the user's home); ``config_file``: the AWS
        config to read instead of ``AWS_CONFIG_FILE`` / ``~/.aws/config``."""
        self.config = config
        self.config_file = config_file
        self.cache_dir = sso_cache_dir(home)
        self._clock = clock
        self._lock = threading.RLock()
        self._session: _EndpointSession | None = None

    @property
    def profile(self) -> str:
        return self.config.profile or "default"

    def reset(self) -> None:
        """Forget cached credentials (after a sign-in, the next call reads the new SSO token)."""
        with self._lock:
            self._session = None

    def _botocore(self) -> _EndpointSession:
        with self._lock:
            if self._session is None:
                try:
                    self._session = _build_session(self.config, self.cache_dir, self.config_file)
                except Exception as exc:
                    raise classify(exc, "reading the AWS config", self.profile) from None
            return self._session

    def boto3(self) -> boto3.Session:
        """A boto3 session on the same credentials and endpoint overrides (for SSM, EC2, RDS)."""
        with self._lock:
            return boto3.Session(botocore_session=self._botocore(), region_name=self.config.region)

    def client(self, service: str, **kwargs: Any):
        try:
            with self._lock:  # botocore sessions are not thread-safe; the clients they make are
                return self._botocore().create_client(service, region_name=self.config.region, **kwargs)
        except Exception as exc:
            raise classify(exc, f"creating an {service} client", self.profile) from None

    def credentials(self) -> AwsCredentials:
        """Current credentials, refreshed by botocore ahead of their expiry."""
        try:
            session = self._botocore()
            with self._lock:
                creds = session.get_credentials()
            if creds is None:
                raise bexc.NoCredentialsError()
            frozen = creds.get_frozen_credentials()
        except Exception as exc:
            raise classify(exc, "loading credentials", self.profile) from None
        expiry = getattr(creds, "_expiry_time", None)
        if getattr(creds, "method", "") == "sso":
            self.cached_sso_token()  # registers the (possibly refreshed) SSO token for masking
        dlog.register_secret(frozen.secret_key)
        dlog.register_secret(frozen.token)
        return AwsCredentials(frozen.access_key, frozen.secret_key, frozen.token,
                              expiry.timestamp() if expiry else None, getattr(creds, "method", ""))

    def caller_arn(self) -> str:
        """The ARN AWS sees (sts:GetCallerIdentity): what Vault's role must be bound to."""
        try:
            return self.client("sts").get_caller_identity()["Arn"]
        except Exception as exc:
            raise classify(exc, "calling sts:GetCallerIdentity", self.profile) from None

    def sso_settings(self) -> SsoSettings | None:
        """The profile's SSO settings, or None when it does not use SSO."""
        session = self._botocore()
        with self._lock:
            full = session.full_config
        prof = full.get("profiles", {}).get(self.profile, {})
        name = prof.get("sso_session")
        if name:
            sess = full.get("sso_sessions", {}).get(name)
            if not sess or "sso_start_url" not in sess or "sso_region" not in sess:
                raise NeedsUserError(f"AWS profile {self.profile!r} names sso_session {name!r}, which is missing or incomplete",
                                     hint=f"add [sso-session {name}] with sso_start_url and sso_region to ~/.aws/config")
            scopes = tuple(s.strip() for s in sess.get("sso_registration_scopes", "").split(",") if s.strip())
            return SsoSettings(sess["sso_start_url"], sess["sso_region"], name, prof.get("sso_account_id", ""),
                               prof.get("sso_role_name", ""), scopes or DEFAULT_SCOPES)
        if "sso_start_url" in prof:
            return SsoSettings(prof["sso_start_url"], prof.get("sso_region", self.config.region), None,
                               prof.get("sso_account_id", ""), prof.get("sso_role_name", ""))
        return None

    def cached_sso_token(self) -> dict[str, Any] | None:
        sso = self.sso_settings()
        if sso is None:
            return None
        try:
            entry = json.loads((self.cache_dir / f"{sso.cache_key}.json").read_text())
        except (OSError, ValueError):
            return None
        _register_sso_secrets(entry)
        return entry

    def sso_expires_at(self) -> float | None:
        """When the cached SSO sign-in expires (None: no SSO, or no cached token)."""
        token = self.cached_sso_token()
        return parse_utc(token.get("expiresAt", "")) if token else None

    def write_sso_token(self, sso: SsoSettings, entry: dict[str, Any]) -> Path:
        """Write a token cache entry as the AWS CLI v2 does (file 0600 in a 0700 folder)."""
        _register_sso_secrets(entry)
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        JSONFileCache(str(self.cache_dir), dumps_func=_json_dumps)[sso.cache_key] = entry
        return self.cache_dir / f"{sso.cache_key}.json"


# ---------------------------------------------------------------------------------------------
# SSO device-authorization sign-in


@dataclass(frozen=True)
class DeviceAuthorization:
    """A started device authorization: show ``verification_uri_complete`` (or the URI and the
    ``user_code``) to the user, then poll until ``expires_at`` every ``interval`` seconds."""

    verification_uri: str
    verification_uri_complete: str
    user_code: str
    expires_at: float
    interval: float
    device_code: str = field(repr=False)
    client_id: str = field(repr=False)
    client_secret: str = field(repr=False)
    registration_expires_at: float = 0.0

    def public(self) -> dict[str, Any]:
        """What a UI may show (no device code or client secret)."""
        return {"verification_uri": self.verification_uri, "user_code": self.user_code,
                "verification_uri_complete": self.verification_uri_complete,
                "expires_at": self.expires_at, "interval": self.interval}


@dataclass(frozen=True)
class PollResult:
    """One CreateToken poll: ``done`` with the cache path, or keep polling every ``interval``."""

    done: bool
    interval: float
    cache_file: Path | None = None


class SsoDeviceLogin:
    """The OIDC device flow for the profile of ``session`` (one instance per sign-in)."""

    def __init__(self, session: AwsSession, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.session = session
        self._clock = clock
        sso = session.sso_settings()
        if sso is None:
            raise NeedsUserError(f"AWS profile {session.profile!r} does not use SSO; there is nothing to sign in to",
                                 hint="sign in with the tool that provides this profile's credentials")
        self.sso = sso

    def _oidc(self):
        return self.session.client("sso-oidc", config=BotoConfig(signature_version=UNSIGNED,
                                                                 region_name=self.sso.region,
                                                                 retries={"max_attempts": 1}))

    def _registration(self, oidc) -> tuple[str, str, float]:
        """Reuse the client registration cached with the token, or register anew."""
        cached = self.session.cached_sso_token() or {}
        expires = parse_utc(cached.get("registrationExpiresAt", "")) or 0.0
        if cached.get("clientId") and cached.get("clientSecret") and expires > self._clock.time() + 3600:
            return cached["clientId"], cached["clientSecret"], expires
        kwargs: dict[str, Any] = {"clientName": f"{CLIENT_NAME}-{int(self._clock.time())}", "clientType": "public"}
        if self.sso.session_name:
            kwargs["scopes"] = list(self.sso.scopes)
        reg = oidc.register_client(**kwargs)
        dlog.register_secret(reg.get("clientSecret"))
        return reg["clientId"], reg["clientSecret"], float(reg.get("clientSecretExpiresAt") or 0)

    def start(self) -> DeviceAuthorization:
        """Register (or reuse the registration) and start a device authorization."""
        try:
            oidc = self._oidc()
            client_id, client_secret, reg_expires = self._registration(oidc)
            resp = oidc.start_device_authorization(clientId=client_id, clientSecret=client_secret,
                                                   startUrl=self.sso.start_url)
        except Exception as exc:
            raise classify(exc, "starting the SSO sign-in", self.session.profile) from None
        now = self._clock.time()
        return DeviceAuthorization(
            verification_uri=resp["verificationUri"],
            verification_uri_complete=resp.get("verificationUriComplete") or resp["verificationUri"],
            user_code=resp["userCode"], expires_at=now + float(resp.get("expiresIn") or 600),
            interval=float(resp.get("interval") or 5), device_code=resp["deviceCode"],
            client_id=client_id, client_secret=client_secret, registration_expires_at=reg_expires)

    def poll(self, auth: DeviceAuthorization, interval: float) -> PollResult:
        """One CreateToken call: pending (same interval), slow_down (+5 s), or done (cache written)."""
        if self._clock.time() >= auth.expires_at:
            raise _sign_in(self.session.profile, "the sign-in code expired before it was approved")
        try:
            dlog.register_secret(auth.device_code)
            resp = self._oidc().create_token(grantType=DEVICE_GRANT, deviceCode=auth.device_code,
                                             clientId=auth.client_id, clientSecret=auth.client_secret)
        except bexc.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "AuthorizationPendingException":
                return PollResult(False, interval)
            if code == "SlowDownException":
                return PollResult(False, interval + SLOW_DOWN_STEP)
            if code == "ExpiredTokenException":
                raise _sign_in(self.session.profile, "the sign-in code expired before it was approved") from None
            if code == "AccessDeniedException":
                raise _sign_in(self.session.profile, "the sign-in was denied in the browser") from None
            raise classify(exc, "completing the SSO sign-in", self.session.profile) from None
        except Exception as exc:
            raise classify(exc, "completing the SSO sign-in", self.session.profile) from None
        return PollResult(True, interval, self._write_cache(auth, resp))

    def _write_cache(self, auth: DeviceAuthorization, resp: dict[str, Any]) -> Path:
        now = self._clock.time()
        entry: dict[str, Any] = {
            "startUrl": self.sso.start_url, "region": self.sso.region,
            "accessToken": resp["accessToken"],
            "expiresAt": format_utc(now + float(resp.get("expiresIn") or 3600)),
            "clientId": auth.client_id, "clientSecret": auth.client_secret,
        }
        if auth.registration_expires_at:
            entry["registrationExpiresAt"] = format_utc(auth.registration_expires_at)
        if resp.get("refreshToken"):
            entry["refreshToken"] = resp["refreshToken"]
        path = self.session.write_sso_token(self.sso, entry)
        self.session.reset()
        return path
