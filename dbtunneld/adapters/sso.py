"""AWS IAM Identity Center sign-in and token refresh, as the AWS CLI v2 does them.

Sources (AWS CLI v2 branch, ``awscli/botocore/utils.py``: ``BaseSSOTokenFetcher``,
``SSOTokenFetcher``, ``SSOTokenFetcherAuth``; ``awscli/customizations/sso/utils.py``:
``do_sso_login``, ``AuthCodeFetcher``, ``OAuthCallbackHandler``; botocore ``tokens.py``:
``SSOTokenProvider._refresher``):

- ``SsoAuthCodeLogin``: the authorization-code grant with PKCE (the default of ``aws sso login``
  since late 2024, for ``sso_session`` profiles): a loopback listener on 127.0.0.1, a browser
  sent to ``<oidc endpoint>/authorize`` (S256 challenge, random state), ``CreateToken`` with
  ``grantType=authorization_code``, the code, the verifier and the exact redirect URI.
- ``SsoDeviceLogin``: the device-authorization grant (``--use-device-code``, headless machines,
  legacy profiles); ``poll`` is one ``CreateToken`` call, the caller's loop owns the pacing.
- Client registrations are shared with the AWS CLI: ``~/.aws/sso/cache/<sha1 of the JSON of
  {tool, startUrl, region, scopes, session_name}>.json``; reused until 15 min before
  ``expiresAt``, and only for the same grant kind (``grantTypes`` present = authorization code).
- ``refresh_sso_token``: the refresh-token grant when < 15 min are left, writing the token cache
  as botocore does; "sign in" is decided from its outcome (no refresh token or registration,
  registration expired, refresh token refused), never from the access token's expiry alone.

Every OIDC client goes to the profile's ``sso_region``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import secrets
import string
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qs, quote, urlencode, urlsplit

import botocore.exceptions as bexc
from botocore import UNSIGNED
from botocore.config import Config as BotoConfig

from ..core.errors import DbtunneldError, NeedsUserError
from ..core.timing import SYSTEM_CLOCK, Clock
from . import log as dlog
from .aws import SSO_REFRESH_LOCK, AwsSession, SsoSettings, classify, format_utc, parse_utc, sign_in_needed

log = logging.getLogger(__name__)

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
AUTH_CODE_GRANTS = ("authorization_code", "refresh_token")
DEFAULT_SCOPE = "sso:account:access"
REDIRECT_PATH = "/oauth/callback"
REGISTERED_REDIRECT = f"http://127.0.0.1{REDIRECT_PATH}"   # the port may differ (RFC 8252 7.3)
EXPIRY_WINDOW = 15 * 60          # botocore: refresh / re-register when less than this is left
SLOW_DOWN_STEP = 5.0
AUTH_CODE_TIMEOUT = 600.0        # the AWS CLI waits 10 minutes for the browser
_REFRESH_KEYS = ("refreshToken", "clientId", "clientSecret", "registrationExpiresAt")
_REFUSED = {"InvalidGrantException", "InvalidClientException", "UnauthorizedClientException",
            "ExpiredTokenException", "AccessDeniedException", "InvalidRequestRegionException"}


def _settings(session: AwsSession) -> SsoSettings:
    sso = session.sso_settings()
    if sso is None:
        raise NeedsUserError(f"AWS profile {session.profile!r} does not use SSO; there is nothing to sign in to",
                             hint="sign in with the tool that provides this profile's credentials")
    return sso


def oidc_client(session: AwsSession, sso: SsoSettings) -> Any:
    """The sso-oidc client of the profile's Identity Center region (unsigned, as botocore's)."""
    return session.client("sso-oidc", region=sso.region,
                          config=BotoConfig(signature_version=UNSIGNED, region_name=sso.region,
                                            retries={"max_attempts": 1}, connect_timeout=10, read_timeout=20))


# ---------------------------------------------------------------------------------------------
# Client registrations, in the AWS CLI's cache


def registration_cache_key(sso: SsoSettings) -> str:
    """The AWS CLI v2 file name (without .json) of the registration for these settings."""
    args = {"tool": "botocore", "startUrl": sso.start_url, "region": sso.region,
            "scopes": list(sso.scopes) if sso.scopes else None, "session_name": sso.session_name}
    return hashlib.sha1(json.dumps(args, sort_keys=True).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Registration:
    client_id: str
    client_secret: str = field(repr=False)
    expires_at: float = 0.0


class Registrations:
    """Read, reuse and write client registrations where the AWS CLI keeps them."""

    def __init__(self, session: AwsSession, sso: SsoSettings, clock: Clock) -> None:
        self.session, self.sso, self.clock = session, sso, clock
        self.path = session.cache_dir / f"{registration_cache_key(sso)}.json"
        self.registered = 0

    def get(self, oidc: Any, auth_code: bool) -> Registration:
        cached = self._cached(auth_code)
        if cached is not None:
            return cached
        return self.register(oidc, auth_code)

    def register(self, oidc: Any, auth_code: bool) -> Registration:
        """Register a new client and write it to the AWS CLI's cache file."""
        kwargs: dict[str, Any] = {"clientName": f"dbtunneld-{self.sso.session_name or int(self.clock.time())}",
                                  "clientType": "public"}
        scopes = list(self.sso.scopes)
        if auth_code:
            kwargs.update(grantTypes=list(AUTH_CODE_GRANTS), redirectUris=[REGISTERED_REDIRECT],
                          issuerUrl=self.sso.start_url, scopes=scopes or [DEFAULT_SCOPE])
        elif scopes:
            kwargs["scopes"] = scopes
        resp = oidc.register_client(**kwargs)
        dlog.register_secret(resp.get("clientSecret"))
        self.registered += 1
        reg = Registration(resp["clientId"], resp["clientSecret"], float(resp["clientSecretExpiresAt"]))
        entry: dict[str, Any] = {"clientId": reg.client_id, "clientSecret": reg.client_secret, "expiresAt": format_utc(reg.expires_at)}
        if auth_code or scopes:
            entry["scopes"] = kwargs["scopes"]
        if auth_code:
            entry["grantTypes"] = list(AUTH_CODE_GRANTS)
        self.session.write_cache_file(self.path.stem, entry)
        return reg

    def forget(self) -> None:
        """Drop a registration AWS refused, so that the next sign-in registers anew."""
        self.path.unlink(missing_ok=True)

    def _cached(self, auth_code: bool) -> Registration | None:
        try:
            entry = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or not entry.get("clientId") or not entry.get("clientSecret"):
            return None
        dlog.register_secret(entry.get("clientSecret"))
        expires = parse_utc(str(entry.get("expiresAt", ""))) or 0.0
        is_auth_code = "authorization_code" in (entry.get("grantTypes") or ())
        if expires - self.clock.time() < EXPIRY_WINDOW or is_auth_code != auth_code:
            return None
        return Registration(entry["clientId"], entry["clientSecret"], expires)


def _is_invalid_client(exc: bexc.ClientError) -> bool:
    code: str = exc.response.get("Error", {}).get("Code", "")
    return code == "InvalidClientException"


def _token_entry(sso: SsoSettings, reg: Registration, resp: dict[str, Any], now: float) -> dict[str, Any]:
    """A token cache entry with the keys botocore's SSOTokenProvider needs to refresh it."""
    entry: dict[str, Any] = {"startUrl": sso.start_url, "region": sso.region, "accessToken": resp["accessToken"],
                             "expiresAt": format_utc(now + float(resp.get("expiresIn") or 3600)),
                             "clientId": reg.client_id, "clientSecret": reg.client_secret,
                             "registrationExpiresAt": format_utc(reg.expires_at)}
    if resp.get("refreshToken"):
        entry["refreshToken"] = resp["refreshToken"]
    return entry


def _save_token(session: AwsSession, sso: SsoSettings, entry: dict[str, Any]) -> Path:
    path = session.write_sso_token(sso, entry)
    session.reset()
    return path


# ---------------------------------------------------------------------------------------------
# Refresh


def refresh_blocker(entry: dict[str, Any], sso: SsoSettings, now: float) -> str:
    """Why this cached token cannot be refreshed ("" when it can), as botocore decides."""
    if sso.session_name is None:
        return "legacy SSO profiles (sso_start_url in the profile) cannot refresh; use an sso-session"
    missing = [k for k in _REFRESH_KEYS if not entry.get(k)]
    if missing:
        return f"the cached sign-in has no {', '.join(missing)}"
    if (parse_utc(str(entry["registrationExpiresAt"])) or 0.0) <= now:
        return "the client registration expired"
    return ""


def _refreshed_elsewhere(session: AwsSession, seen: dict[str, Any], now: float) -> float | None:
    """Another process (the AWS CLI, another dbtunneld) refreshed the token meanwhile and spent the
    refresh token we used: its new token's expiry, when it is a working one."""
    fresh = session.cached_sso_token() or {}
    expires = parse_utc(str(fresh.get("expiresAt", ""))) or 0.0
    if fresh.get("accessToken") and fresh.get("accessToken") != seen.get("accessToken") and expires > now:
        return expires
    return None


class _RefreshRefused(Exception):
    """AWS answered the refresh-token grant with a final no (the SSO session is over)."""


def refresh_sso_token(session: AwsSession, *, clock: Clock = SYSTEM_CLOCK, window: float = EXPIRY_WINDOW) -> float:
    """Keep the cached SSO token usable; returns when its access token expires.

    With less than ``window`` left, refresh it (refresh-token grant) and write the cache.
    ``SignInNeededError`` only when the token is expired and cannot be refreshed; a refused
    refresh while the token still works returns its expiry (the caller asks again later)."""
    sso = _settings(session)
    with SSO_REFRESH_LOCK:
        return _refresh_if_due(session, sso, clock.time(), window)


def _refresh_if_due(session: AwsSession, sso: SsoSettings, now: float, window: float) -> float:
    entry = session.cached_sso_token()
    if not entry or not entry.get("accessToken"):
        raise sign_in_needed(session.profile, "no SSO sign-in on this machine yet")
    expires = parse_utc(str(entry.get("expiresAt", ""))) or 0.0
    if expires - now >= window:
        return expires
    why = refresh_blocker(entry, sso, now)
    if not why:
        try:
            return _refresh(session, sso, entry, now)
        except _RefreshRefused as exc:
            why = str(exc)
        other = _refreshed_elsewhere(session, entry, now)
        if other is not None:
            return other
    if expires > now:
        log.info("SSO token of profile %s cannot be refreshed (%s); it works for %.0f s more",
                 session.profile, why, expires - now)
        return expires
    raise sign_in_needed(session.profile, f"the SSO session ended ({why})")


def _refresh(session: AwsSession, sso: SsoSettings, entry: dict[str, Any], now: float) -> float:
    dlog.register_secret(entry.get("refreshToken"))
    try:
        resp = oidc_client(session, sso).create_token(grantType="refresh_token", clientId=entry["clientId"],
                                                      clientSecret=entry["clientSecret"],
                                                      refreshToken=entry["refreshToken"])
    except bexc.ClientError as exc:
        code = exc.response.get("Error", {}).get("Code", "")
        if code == "InvalidClientException":
            Registrations(session, sso, SYSTEM_CLOCK).forget()
        if code in _REFUSED:
            raise _RefreshRefused(f"AWS refused the refresh: {code}") from None
        raise classify(exc, "refreshing the SSO token", session.profile) from None
    except Exception as exc:
        raise classify(exc, "refreshing the SSO token", session.profile) from None
    reg = Registration(entry["clientId"], entry["clientSecret"], parse_utc(entry["registrationExpiresAt"]) or 0.0)
    new = _token_entry(sso, reg, resp, now)
    new.setdefault("refreshToken", entry["refreshToken"])
    _save_token(session, sso, new)
    log.info("SSO token of profile %s refreshed", session.profile)
    return now + float(resp.get("expiresIn") or 3600)


# ---------------------------------------------------------------------------------------------
# Device authorization


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
    registration: Registration = field(repr=False)

    def public(self) -> dict[str, Any]:
        """What a UI may show (no device code or client secret)."""
        return {"flow": "device_code", "verification_uri": self.verification_uri, "user_code": self.user_code,
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
        self.sso = _settings(session)
        self.registrations = Registrations(session, self.sso, clock)

    def start(self) -> DeviceAuthorization:
        """Register (or reuse the CLI's registration) and start a device authorization."""
        try:
            resp, reg = self._start()
        except Exception as exc:
            raise classify(exc, "starting the SSO sign-in", self.session.profile) from None
        dlog.register_secret(resp["deviceCode"])
        return self._authorization(resp, reg)

    def _start(self) -> tuple[dict[str, Any], Registration]:
        oidc = oidc_client(self.session, self.sso)
        reg = self.registrations.get(oidc, auth_code=False)
        try:
            return self._start_with(oidc, reg), reg
        except bexc.ClientError as exc:
            if not _is_invalid_client(exc):
                raise
        log.info("the cached SSO client registration was refused (expired early?); registering anew")
        reg = self.registrations.register(oidc, auth_code=False)
        return self._start_with(oidc, reg), reg

    def _start_with(self, oidc: Any, reg: Registration) -> dict[str, Any]:
        started: dict[str, Any] = oidc.start_device_authorization(clientId=reg.client_id, clientSecret=reg.client_secret,
                                               startUrl=self.sso.start_url)
        return started

    def _authorization(self, resp: dict[str, Any], reg: Registration) -> DeviceAuthorization:
        return DeviceAuthorization(
            verification_uri=resp["verificationUri"],
            verification_uri_complete=resp.get("verificationUriComplete") or resp["verificationUri"],
            user_code=resp["userCode"], expires_at=self._clock.time() + float(resp.get("expiresIn") or 600),
            interval=float(resp.get("interval") or 5), device_code=resp["deviceCode"], registration=reg)

    def poll(self, auth: DeviceAuthorization, interval: float) -> PollResult:
        """One CreateToken call: pending (same interval), slow_down (+5 s), or done (cache written)."""
        if self._clock.time() >= auth.expires_at:
            raise sign_in_needed(self.session.profile, "the sign-in code expired before it was approved")
        reg = auth.registration
        try:
            resp = oidc_client(self.session, self.sso).create_token(
                grantType=DEVICE_GRANT, deviceCode=auth.device_code, clientId=reg.client_id,
                clientSecret=reg.client_secret)
        except bexc.ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "")
            if code == "AuthorizationPendingException":
                return PollResult(False, interval)
            if code == "SlowDownException":
                return PollResult(False, interval + SLOW_DOWN_STEP)
            if code == "ExpiredTokenException":
                raise sign_in_needed(self.session.profile, "the sign-in code expired before it was approved") from None
            if code == "AccessDeniedException":
                raise sign_in_needed(self.session.profile, "the sign-in was denied in the browser") from None
            raise classify(exc, "completing the SSO sign-in", self.session.profile) from None
        except Exception as exc:
            raise classify(exc, "completing the SSO sign-in", self.session.profile) from None
        path = _save_token(self.session, self.sso, _token_entry(self.sso, reg, resp, self._clock.time()))
        return PollResult(True, interval, path)


# ---------------------------------------------------------------------------------------------
# Authorization code with PKCE


def pkce_pair() -> tuple[str, str]:
    """(verifier, S256 challenge without padding), as RFC 7636 and the AWS CLI make them."""
    alphabet = string.ascii_letters + string.digits + "-._~"
    verifier = "".join(secrets.choice(alphabet) for _ in range(64))
    challenge = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).decode().rstrip("=")
    return verifier, challenge


class StopFlag(Protocol):
    def is_set(self) -> bool: ...


class _Callback:
    """What the loopback listener received (once)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.code = self.state = self.error = ""


def _callback_handler(callback: _Callback) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, fmt: str, *args: Any) -> None:   # the query holds the code: never log it
            pass

        def do_GET(self) -> None:
            url = urlsplit(self.path)
            if url.path != REDIRECT_PATH:
                self.send_error(404)
                return
            query = {k: v[0] for k, v in parse_qs(url.query).items()}
            ok = bool(query.get("code")) and not query.get("error")
            body = (b"<p>dbtunneld: signed in to AWS. You may close this window.</p>" if ok else
                    b"<p>dbtunneld: the AWS sign-in did not complete. Try again from the tray or CLI.</p>")
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            if not callback.done.is_set():
                callback.code, callback.state = query.get("code", ""), query.get("state", "")
                callback.error = query.get("error", "") if not ok else ""
                dlog.register_secret(callback.code or None)
                callback.done.set()

    return Handler


class SsoAuthCodeLogin:
    """The authorization-code flow with PKCE for an ``sso_session`` profile (one per sign-in):
    ``start()`` returns the URL to open; ``finish(stop)`` waits for the browser's redirect to
    the loopback listener, exchanges the code and writes the token cache."""

    def __init__(self, session: AwsSession, *, clock: Clock = SYSTEM_CLOCK, timeout: float = AUTH_CODE_TIMEOUT) -> None:
        self.session = session
        self._clock = clock
        self.timeout = timeout
        self.sso = _settings(session)
        if self.sso.session_name is None:
            raise NeedsUserError(f"AWS profile {session.profile!r} is a legacy SSO profile; the browser sign-in "
                                 "needs an sso-session", hint="use the device code (`dbtunneld login --no-browser`), "
                                 "or move sso_start_url/sso_region into an [sso-session] section")
        self.registrations = Registrations(session, self.sso, clock)
        self.verifier, self.challenge = pkce_pair()
        dlog.register_secret(self.verifier)
        self.state = secrets.token_urlsafe(24)
        self._callback = _Callback()
        self._server: HTTPServer | None = None
        self._registration: Registration | None = None
        self.redirect_uri = ""

    def start(self) -> dict[str, Any]:
        """Listen on loopback, register (or reuse the CLI's registration); the URL to open."""
        try:
            oidc = oidc_client(self.session, self.sso)
            self._registration = self.registrations.get(oidc, auth_code=True)
        except Exception as exc:
            raise classify(exc, "starting the SSO sign-in", self.session.profile) from None
        self._server = HTTPServer(("127.0.0.1", 0), _callback_handler(self._callback))
        self._server.timeout = 0.5
        self.redirect_uri = f"http://127.0.0.1:{self._server.server_port}{REDIRECT_PATH}"
        url = self._authorize_url(oidc.meta.endpoint_url)
        return {"flow": "authorization_code", "verification_uri": url, "verification_uri_complete": url,
                "user_code": "", "expires_at": self._clock.time() + self.timeout}

    def _authorize_url(self, endpoint: str) -> str:
        assert self._registration is not None
        params = {"response_type": "code", "client_id": self._registration.client_id,
                  "redirect_uri": self.redirect_uri, "state": self.state, "code_challenge_method": "S256",
                  "scopes": " ".join(self.sso.scopes or (DEFAULT_SCOPE,)), "code_challenge": self.challenge}
        return f"{endpoint.rstrip('/')}/authorize?{urlencode(params, quote_via=quote)}"

    def finish(self, stop: StopFlag) -> Path:
        """Wait (bounded) for the redirect, check the state, exchange the code; the cache file."""
        try:
            self._wait(stop)
        finally:
            self.close()
        cb = self._callback
        if cb.error or not cb.code:
            raise sign_in_needed(self.session.profile, f"the browser sign-in failed ({cb.error or 'no code'})")
        if not secrets.compare_digest(cb.state, self.state):
            raise sign_in_needed(self.session.profile, "the browser sign-in answered with a wrong state; try again")
        return self._exchange(cb.code)

    def _wait(self, stop: StopFlag) -> None:
        deadline = self._clock.time() + self.timeout
        while not self._callback.done.is_set():
            if stop.is_set():
                raise DbtunneldError("the SSO sign-in was cancelled")
            if self._clock.time() >= deadline:
                raise sign_in_needed(self.session.profile, "the browser sign-in was not completed in time")
            assert self._server is not None
            self._server.handle_request()

    def _exchange(self, code: str) -> Path:
        reg = self._registration
        assert reg is not None
        try:
            resp = oidc_client(self.session, self.sso).create_token(
                grantType="authorization_code", clientId=reg.client_id, clientSecret=reg.client_secret,
                redirectUri=self.redirect_uri, codeVerifier=self.verifier, code=code)
        except bexc.ClientError as exc:
            code_name = exc.response.get("Error", {}).get("Code", "")
            if code_name in _REFUSED:
                raise sign_in_needed(self.session.profile, f"AWS refused the sign-in code ({code_name})") from None
            raise classify(exc, "completing the SSO sign-in", self.session.profile) from None
        except Exception as exc:
            raise classify(exc, "completing the SSO sign-in", self.session.profile) from None
        return _save_token(self.session, self.sso, _token_entry(self.sso, reg, resp, self._clock.time()))

    def close(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.server_close()
