"""AWS through boto3/botocore: a session from a named profile, and the built-in SSO sign-in.

``AwsSession`` resolves credentials the way the AWS CLI does (SSO profiles in both the
``sso_session`` and the legacy form, assume-role, static, environment), applies the endpoint
overrides of ``config.aws.endpoint_urls`` to every client botocore creates (including the ones
the SSO provider creates internally), and reports when the credentials expire. The SSO token
cache is the AWS CLI v2 one (``~/.aws/sso/cache/<sha1(session name or start url)>.json``), so
``aws`` and dbtunneld share one sign-in.

An endpoint URL may hold ``{region}``: it is replaced by the region of each client (a proxy or
stand-in serving several regions). The SSO clients (sso-oidc, and the portal botocore calls for
role credentials) always use the profile's ``sso_region``, never ``aws.region``.

The sign-in flows and the token refresh are in ``sso``.

``classify`` is the one place that turns botocore failures into dbtunneld errors; an expired or
missing SSO session always becomes ``SignInNeededError``.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping

import boto3
import botocore.exceptions as bexc
import botocore.session
from botocore.credentials import (
    AssumeRoleProvider,
    ProfileProviderBuilder,
    SSOProvider,
    create_credential_resolver,
)
from botocore.tokens import SSOTokenProvider
from botocore.utils import JSONFileCache

from ..core.config import AwsConfig
from ..core.errors import DbtunneldError, NeedsUserError, PermissionDeniedError, SignInNeededError, TransientError, reraise_if_bug
from ..core.timing import SYSTEM_CLOCK, Clock
from . import log as dlog

_SIGN_IN_CODES = {"UnauthorizedException", "UnauthorizedClientException", "InvalidGrantException",
                  "ExpiredTokenException"}
_DENIED_CODES = {"AccessDenied", "AccessDeniedException", "InvalidClientTokenId", "SignatureDoesNotMatch",
                 "UnrecognizedClientException", "ForbiddenException"}
_TRANSIENT_CODES = {"Throttling", "ThrottlingException", "TooManyRequestsException", "RequestTimeout",
                    "RequestTimeoutException", "ServiceUnavailable", "ServiceUnavailableException",
                    "InternalError", "InternalFailure", "InternalServerException", "SlowDown"}


# ---------------------------------------------------------------------------------------------
# Error classification


def sign_in_needed(profile: str, why: str) -> SignInNeededError:
    return SignInNeededError(f"AWS SSO sign-in needed for profile {profile!r}: {why}")


def classify(exc: BaseException, doing: str, profile: str) -> DbtunneldError:
    """The dbtunneld error for a botocore failure while ``doing`` with ``profile``; a bug
    (``errors.is_bug``) is not classified but raised as it is."""
    if isinstance(exc, DbtunneldError):
        return exc
    reraise_if_bug(exc)
    if isinstance(exc, (bexc.SSOTokenLoadError, bexc.UnauthorizedSSOTokenError)):
        return sign_in_needed(profile, "the SSO session is missing or expired")
    if isinstance(exc, bexc.TokenRetrievalError):
        return sign_in_needed(profile, "the SSO session expired and could not be refreshed")
    if isinstance(exc, bexc.SSOError):
        return sign_in_needed(profile, str(exc))
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
        return sign_in_needed(profile, f"{code} while {doing}")
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
    scopes: tuple[str, ...] = ()          # sso_registration_scopes as written (may be empty)

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


SSO_REFRESH_LOCK = threading.RLock()   # one SSO token refresh at a time in this process


class _SerialSSOTokenProvider(SSOTokenProvider):
    """botocore's provider, refreshing under ``SSO_REFRESH_LOCK`` so that it and the SSO keeper
    never spend the same refresh token twice."""

    def _refresher(self):
        with SSO_REFRESH_LOCK:
            return super()._refresher()


class _EndpointSession(botocore.session.Session):
    """A botocore session that applies endpoint overrides to every client it creates."""

    def __init__(self, endpoints: Mapping[str, str], profile: str | None) -> None:
        super().__init__(profile=profile or None)
        self._endpoint_overrides = dict(endpoints)

    def create_client(self, service_name, *args, **kwargs):
        url = self._endpoint_overrides.get(service_name)
        if url and len(args) < 5 and kwargs.get("endpoint_url") is None:
            kwargs["endpoint_url"] = url.replace("{region}", self._client_region(args, kwargs))
        return super().create_client(service_name, *args, **kwargs)

    def _client_region(self, args: tuple, kwargs: dict) -> str:
        """The region botocore gives this client: argument, then its Config, then the session's."""
        config = kwargs.get("config")
        return (args[0] if args else None) or kwargs.get("region_name") or \
            getattr(config, "region_name", None) or self.get_config_variable("region") or "us-east-1"


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
                token_provider=_SerialSSOTokenProvider(session, cache=token_cache, profile_name=profile))
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

    def client(self, service: str, region: str | None = None, **kwargs: Any):
        """A client of ``service`` in ``region`` (default ``aws.region``)."""
        try:
            with self._lock:  # botocore sessions are not thread-safe; the clients they make are
                return self._botocore().create_client(service, region_name=region or self.config.region, **kwargs)
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

    def profile_region(self) -> str:
        """The profile's own region: ``AWS_REGION``, ``AWS_DEFAULT_REGION``, then ``region`` of the
        profile in ~/.aws/config, else ``aws.region`` (what ``vault.sts_region = "auto"`` means)."""
        env = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if env:
            return env
        try:
            with self._lock:
                scoped = self._botocore().get_scoped_config()
        except Exception as exc:
            raise classify(exc, "reading the AWS profile's region", self.profile) from None
        return scoped.get("region") or self.config.region

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
                               prof.get("sso_role_name", ""), scopes)
        if "sso_start_url" in prof:
            if "sso_region" not in prof:
                raise NeedsUserError(f"AWS profile {self.profile!r} has sso_start_url but no sso_region",
                                     hint="add sso_region (the region of your IAM Identity Center) to the profile")
            return SsoSettings(prof["sso_start_url"], prof["sso_region"], None,
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
        return self.write_cache_file(sso.cache_key, entry)

    def write_cache_file(self, key: str, entry: dict[str, Any]) -> Path:
        """Write ``<sso cache>/<key>.json`` (tokens and client registrations share the folder)."""
        _register_sso_secrets(entry)
        self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        JSONFileCache(str(self.cache_dir), dumps_func=_json_dumps)[key] = entry
        return self.cache_dir / f"{key}.json"
