"""State of the SSO stand-in: IAM Identity Center's OIDC service (sso-oidc) and the bearer
tokens the portal accepts, as strict as AWS on every point dbtunneld relies on.

Written from the real API and the real clients (cited so they can be re-read):

- SSO OIDC API reference, RegisterClient / StartDeviceAuthorization / CreateToken, and the
  error shapes of botocore's ``botocore/data/sso-oidc/2019-06-10/service-2.json``:
  ``AuthorizationPendingException``, ``SlowDownException`` (poll sooner than ``interval``),
  ``ExpiredTokenException`` (device code past ``expiresIn``), ``InvalidGrantException``
  (unknown, used, expired or mismatched grant: RFC 6749 5.2 ``invalid_grant``, also for an
  expired refresh token), ``InvalidClientException`` (unknown client, wrong or expired
  ``clientSecret``: "an expired clientSecret"), ``UnauthorizedClientException`` (grant type
  not registered for the client), ``InvalidRedirectUriException``,
  ``InvalidRequestRegionException`` ("a token ... is only usable by calling IAM Identity
  Center endpoints in another region"), ``UnsupportedGrantTypeException``.
- Regions: every Identity Center instance lives in one region; its endpoints are
  ``oidc.<region>.amazonaws.com`` and ``portal.sso.<region>.amazonaws.com``; botocore's
  ``tokens.py`` ``SSOTokenProvider._client`` and ``credentials.py``
  ``SSOCredentialFetcher._get_credentials`` build both clients for the profile's
  ``sso_region``. Here a region is a path prefix (``/oidc.<region>/``,
  ``/portal.sso.<region>/``); the instance serves ``config.region`` only. Elsewhere: a client
  registration, device code, authorization code or token of another region is
  ``InvalidRequestRegionException`` / portal 401, and the start URL is unknown
  (``InvalidRequestException``), so a client talking to the wrong region fails as on AWS.
- Lifetimes: access tokens 1 h (``access_token_ttl``); refresh tokens end with the SSO
  session (``refresh_token_ttl`` from the sign-in; rotation does not extend it, as the
  session duration of Identity Center is fixed at sign-in); registrations end at
  ``clientSecretExpiresAt`` (``registration_ttl``, 90 days on AWS).
- Authorization code with PKCE (AWS CLI v2 ``awscli/botocore/utils.py``
  ``SSOTokenFetcherAuth`` and ``awscli/customizations/sso/utils.py`` ``AuthCodeFetcher``):
  RegisterClient with ``grantTypes`` [authorization_code, refresh_token], ``redirectUris``
  [``http://127.0.0.1/oauth/callback``] and ``issuerUrl`` (the start URL); ``GET
  /authorize?response_type=code&client_id&redirect_uri&state&code_challenge_method=S256
  &scopes&code_challenge``; the redirect URI must be loopback http and match a registered one
  except for the port (RFC 8252 7.3); the code is single-use, short-lived
  (``auth_code_ttl``), bound to client, redirect URI and challenge; CreateToken with
  ``grantType=authorization_code``, ``code``, ``redirectUri`` (exactly as authorized) and
  ``codeVerifier`` (BASE64URL(SHA256(verifier)) == challenge, RFC 7636 4.6).
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
import string
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import urlsplit

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REFRESH_GRANT = "refresh_token"
AUTH_CODE_GRANT = "authorization_code"
LOOPBACK_HOSTS = ("127.0.0.1", "[::1]", "localhost")


class ApiError(Exception):
    """An error in AWS's rest-json shape: ``x-amzn-ErrorType`` header plus a JSON body."""

    def __init__(self, status: int, code: str, body: dict) -> None:
        super().__init__(code)
        self.status, self.code, self.body = status, code, body


def oidc_error(code: str, error: str, description: str, status: int = 400) -> ApiError:
    return ApiError(status, code, {"error": error, "error_description": description})


def portal_error(code: str, message: str, status: int) -> ApiError:
    return ApiError(status, code, {"message": message})


def _wrong_region(what: str, region: str) -> ApiError:
    return oidc_error("InvalidRequestRegionException", "invalid_request",
                      f"{what} was issued in {region} and is only usable at that region's endpoints")


@dataclass
class SsoConfig:
    listen_port: int
    start_url: str
    seed_file: str
    accounts: list[dict]
    region: str = "us-east-1"
    user_name: str = "alice@example.com"
    access_token_ttl: int = 3600
    refresh_token_ttl: int = 8 * 3600
    registration_ttl: int = 90 * 86400
    device_code_ttl: int = 600
    auth_code_ttl: int = 300
    interval: int = 1
    role_credentials_ttl: int = 3600

    @classmethod
    def load(cls, path: Path) -> "SsoConfig":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class Client:
    region: str
    secret: str
    expires_at: float
    grant_types: tuple[str, ...] = (DEVICE_GRANT, REFRESH_GRANT)
    redirect_uris: tuple[str, ...] = ()


@dataclass
class DeviceAuth:
    client_id: str
    user_code: str
    expires_at: float
    interval: float
    status: str = "pending"           # pending | approved | denied | used
    last_poll: float = 0.0


@dataclass
class AuthRequest:
    """An /authorize request waiting for the user's consent, then its code."""

    client_id: str
    redirect_uri: str
    state: str
    challenge: str
    code: str = ""
    code_expires_at: float = 0.0
    used: bool = False


@dataclass
class Token:
    client_id: str
    region: str
    expires_at: float
    session_ends_at: float = float("inf")
    revoked: bool = False


@dataclass
class SsoState:
    """Everything the stand-in remembers (in memory, guarded by one lock)."""

    config: SsoConfig
    clock: Callable[[], float] = time.time
    lock: threading.Lock = field(default_factory=threading.Lock)
    clients: dict[str, Client] = field(default_factory=dict)
    devices: dict[str, DeviceAuth] = field(default_factory=dict)     # deviceCode -> auth
    user_codes: dict[str, str] = field(default_factory=dict)         # userCode -> deviceCode
    auth_requests: dict[str, AuthRequest] = field(default_factory=dict)   # request id -> request
    codes: dict[str, str] = field(default_factory=dict)              # code -> request id
    access: dict[str, Token] = field(default_factory=dict)
    refresh: dict[str, Token] = field(default_factory=dict)
    auto_approve: bool = False
    registrations: int = 0

    # -- RegisterClient

    def register_client(self, body: dict, region: str | None = None) -> dict:
        region = region or self.config.region
        if not body.get("clientName") or body.get("clientType") != "public":
            raise oidc_error("InvalidRequestException", "invalid_request", "clientName and clientType=public are required")
        grants = tuple(body.get("grantTypes") or (DEVICE_GRANT, REFRESH_GRANT))
        redirects = tuple(body.get("redirectUris") or ())
        if AUTH_CODE_GRANT in grants:
            _check_registration_for_auth_code(redirects, body.get("issuerUrl"))
        client_id, secret = "sandbox-" + secrets.token_urlsafe(16), secrets.token_urlsafe(48)
        now = int(self.clock())
        expires = now + self.config.registration_ttl
        with self.lock:
            self.clients[client_id] = Client(region, secret, expires, grants, redirects)
            self.registrations += 1
        return {"clientId": client_id, "clientSecret": secret, "clientIdIssuedAt": now,
                "clientSecretExpiresAt": expires}

    def _check_client(self, body: dict, region: str) -> Client:
        client = self.clients.get(body.get("clientId") or "")
        if client is None or not secrets.compare_digest(client.secret, str(body.get("clientSecret") or "")):
            raise oidc_error("InvalidClientException", "invalid_client", "Invalid client", 401)
        if client.region != region:
            raise _wrong_region("the client registration", client.region)
        if self.clock() >= client.expires_at:
            raise oidc_error("InvalidClientException", "invalid_client", "Client secret has expired", 401)
        return client

    def _check_start_url(self, start_url: str, region: str) -> None:
        if start_url.rstrip("/") != self.config.start_url.rstrip("/") or region != self.config.region:
            raise oidc_error("InvalidRequestException", "invalid_request",
                             f"no IAM Identity Center instance with start URL {start_url!r} in {region}")

    # -- StartDeviceAuthorization

    def start_device_authorization(self, body: dict, base_url: str, region: str | None = None) -> dict:
        region = region or self.config.region
        with self.lock:
            client = self._check_client(body, region)
            self._check_start_url(body.get("startUrl") or "", region)
            if DEVICE_GRANT not in client.grant_types:
                raise oidc_error("UnauthorizedClientException", "unauthorized_client", "device_code is not registered")
            device_code, user_code = secrets.token_urlsafe(32), _user_code()
            self.devices[device_code] = DeviceAuth(body["clientId"], user_code, self.clock() + self.config.device_code_ttl,
                                                   self.config.interval, "approved" if self.auto_approve else "pending")
            self.user_codes[user_code] = device_code
        return {"deviceCode": device_code, "userCode": user_code,
                "verificationUri": f"{base_url}/device",
                "verificationUriComplete": f"{base_url}/device?user_code={user_code}",
                "expiresIn": self.config.device_code_ttl, "interval": self.config.interval}

    # -- /authorize (browser) and consent

    def authorize(self, query: dict, region: str) -> str:
        """Validate an /authorize request and return its id; errors are shown, never redirected
        (RFC 6749 4.1.2.1)."""
        with self.lock:
            client = self.clients.get(query.get("client_id", ""))
            if client is None:
                raise oidc_error("InvalidClientException", "invalid_client", "Invalid client", 400)
            if client.region != region:
                raise _wrong_region("the client registration", client.region)
            if self.clock() >= client.expires_at:
                raise oidc_error("InvalidClientException", "invalid_client", "Client secret has expired", 400)
            if AUTH_CODE_GRANT not in client.grant_types or query.get("response_type") != "code":
                raise oidc_error("UnauthorizedClientException", "unauthorized_client", "authorization_code is not registered")
            redirect = query.get("redirect_uri", "")
            if not _redirect_allowed(redirect, client.redirect_uris):
                raise oidc_error("InvalidRedirectUriException", "invalid_redirect_uri", f"redirect_uri {redirect!r}")
            if query.get("code_challenge_method") != "S256" or len(query.get("code_challenge", "")) < 43:
                raise oidc_error("InvalidRequestException", "invalid_request", "PKCE with code_challenge_method=S256 is required")
            if region != self.config.region:
                raise oidc_error("InvalidRequestException", "invalid_request", f"no IAM Identity Center instance in {region}")
            request_id = secrets.token_urlsafe(16)
            self.auth_requests[request_id] = AuthRequest(query["client_id"], redirect, query.get("state", ""),
                                                         query["code_challenge"].rstrip("="))
            return request_id

    def consent(self, request_id: str, allow: bool) -> str:
        """The user's answer: the redirect URL (``code`` and ``state``, or ``error``)."""
        with self.lock:
            request = self.auth_requests.get(request_id)
            if request is None or request.code or request.used:
                raise oidc_error("InvalidRequestException", "invalid_request", "unknown or finished sign-in request")
            sep = "&" if "?" in request.redirect_uri else "?"
            if not allow:
                request.used = True
                return f"{request.redirect_uri}{sep}error=access_denied&state={request.state}"
            request.code = secrets.token_urlsafe(32)
            request.code_expires_at = self.clock() + self.config.auth_code_ttl
            self.codes[request.code] = request_id
            return f"{request.redirect_uri}{sep}code={request.code}&state={request.state}"

    # -- CreateToken

    def create_token(self, body: dict, region: str | None = None) -> dict:
        region = region or self.config.region
        with self.lock:
            client = self._check_client(body, region)
            grant = body.get("grantType")
            if grant not in (DEVICE_GRANT, REFRESH_GRANT, AUTH_CODE_GRANT):
                raise oidc_error("UnsupportedGrantTypeException", "unsupported_grant_type", f"grant type {grant!r}")
            if grant not in client.grant_types:
                raise oidc_error("UnauthorizedClientException", "unauthorized_client", f"{grant} is not registered")
            client_id = body["clientId"]
            if grant == DEVICE_GRANT:
                self._take_device_grant(client_id, body.get("deviceCode") or "")
                session_end = self.clock() + self.config.refresh_token_ttl
            elif grant == AUTH_CODE_GRANT:
                self._take_auth_code(client_id, body)
                session_end = self.clock() + self.config.refresh_token_ttl
            else:
                session_end = self._take_refresh_grant(client_id, body.get("refreshToken") or "", region)
            return self._issue(client_id, region, session_end)

    def _take_device_grant(self, client_id: str, device_code: str) -> None:
        auth = self.devices.get(device_code)
        now = self.clock()
        if auth is None or auth.client_id != client_id or auth.status == "used":
            raise oidc_error("InvalidGrantException", "invalid_grant", "Invalid grant provided")
        if now >= auth.expires_at:
            raise oidc_error("ExpiredTokenException", "expired_token", "Device code has expired")
        if auth.status == "denied":
            raise oidc_error("AccessDeniedException", "access_denied", "The user denied the authorization")
        too_soon = auth.last_poll and now - auth.last_poll < auth.interval
        auth.last_poll = now
        if too_soon:
            raise oidc_error("SlowDownException", "slow_down", "Client is polling too quickly")
        if auth.status != "approved":
            raise oidc_error("AuthorizationPendingException", "authorization_pending", "Authorization is still pending")
        auth.status = "used"

    def _take_auth_code(self, client_id: str, body: dict) -> None:
        request = self.auth_requests.get(self.codes.pop(body.get("code") or "", ""))
        invalid = oidc_error("InvalidGrantException", "invalid_grant", "Invalid authorization code")
        if request is None or request.used or request.client_id != client_id:
            raise invalid
        request.used = True                      # single use, even when the checks below fail
        if self.clock() >= request.code_expires_at:
            raise oidc_error("InvalidGrantException", "invalid_grant", "Authorization code has expired")
        if body.get("redirectUri") != request.redirect_uri:
            raise oidc_error("InvalidGrantException", "invalid_grant", "redirectUri does not match the authorization")
        verifier = str(body.get("codeVerifier") or "")
        if not 43 <= len(verifier) <= 128 or not secrets.compare_digest(_s256(verifier), request.challenge):
            raise oidc_error("InvalidGrantException", "invalid_grant", "codeVerifier does not match code_challenge")

    def _take_refresh_grant(self, client_id: str, refresh_token: str, region: str) -> float:
        token = self.refresh.get(refresh_token)
        if token is None or token.revoked or token.client_id != client_id:
            raise oidc_error("InvalidGrantException", "invalid_grant", "Invalid refresh token provided")
        if token.region != region:
            raise _wrong_region("the refresh token", token.region)
        if self.clock() >= token.session_ends_at:
            raise oidc_error("InvalidGrantException", "invalid_grant", "Refresh token has expired (the SSO session ended)")
        del self.refresh[refresh_token]          # rotated: the old one is spent
        return token.session_ends_at

    def _issue(self, client_id: str, region: str, session_end: float) -> dict:
        access, refresh = "sandbox-at-" + secrets.token_urlsafe(32), "sandbox-rt-" + secrets.token_urlsafe(32)
        ttl = self.config.access_token_ttl
        self.access[access] = Token(client_id, region, min(self.clock() + ttl, session_end), session_end)
        self.refresh[refresh] = Token(client_id, region, session_end, session_end)
        return {"accessToken": access, "tokenType": "Bearer", "expiresIn": ttl, "refreshToken": refresh}

    def approve(self, user_code: str, status: str = "approved") -> bool:
        with self.lock:
            auth = self.devices.get(self.user_codes.get(user_code.strip().upper(), ""))
            if auth is None or auth.status not in ("pending", "approved", "denied"):
                return False
            auth.status = status
        return True

    # -- the portal's bearer tokens

    def check_access_token(self, token: str, region: str | None = None) -> None:
        region = region or self.config.region
        with self.lock:
            entry = self.access.get(token or "")
            if entry is None or entry.revoked or self.clock() >= entry.expires_at or entry.region != region:
                raise portal_error("UnauthorizedException", "Session token not found or invalid", 401)

    def logout(self, token: str) -> None:
        with self.lock:
            if token in self.access:
                self.access[token].revoked = True

    # -- test controls

    def expire_tokens(self) -> int:
        with self.lock:
            for t in self.access.values():
                t.expires_at = min(t.expires_at, self.clock() - 1)
            return len(self.access)

    def end_sessions(self) -> int:
        """Every SSO session ends now: access and refresh tokens expire (as at the session's end)."""
        with self.lock:
            for t in list(self.access.values()) + list(self.refresh.values()):
                t.expires_at = t.session_ends_at = min(t.session_ends_at, self.clock() - 1)
            return len(self.refresh)

    def expire_registrations(self) -> int:
        with self.lock:
            for c in self.clients.values():
                c.expires_at = min(c.expires_at, self.clock() - 1)
            return len(self.clients)

    def revoke_tokens(self) -> int:
        with self.lock:
            for t in list(self.access.values()) + list(self.refresh.values()):
                t.revoked = True
            return len(self.access) + len(self.refresh)

    def summary(self) -> dict:
        with self.lock:
            return {"clients": len(self.clients), "registrations": self.registrations,
                    "device_codes": len(self.devices),
                    "pending": sum(d.status == "pending" for d in self.devices.values()),
                    "auth_requests": len(self.auth_requests), "access_tokens": len(self.access),
                    "refresh_tokens": len(self.refresh), "auto_approve": self.auto_approve}


def _s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii", "replace")).digest()).decode().rstrip("=")


def _is_loopback_http(uri: str) -> bool:
    parts = urlsplit(uri)
    return parts.scheme == "http" and (parts.hostname or "") in ("127.0.0.1", "::1", "localhost")


def _check_registration_for_auth_code(redirects: tuple[str, ...], issuer: str | None) -> None:
    if not redirects or not issuer:
        raise oidc_error("InvalidRequestException", "invalid_request",
                         "authorization_code needs redirectUris and issuerUrl")
    if not all(_is_loopback_http(uri) for uri in redirects):
        raise oidc_error("InvalidRedirectUriException", "invalid_redirect_uri", "redirect URIs must be loopback http")


def _redirect_allowed(uri: str, registered: tuple[str, ...]) -> bool:
    """Loopback http, and equal to a registered URI except for the port (RFC 8252 7.3)."""
    if not _is_loopback_http(uri):
        return False
    got = urlsplit(uri)
    for reg in registered:
        want = urlsplit(reg)
        if (got.hostname, got.path, got.query) == (want.hostname, want.path, want.query) and want.port in (None, got.port):
            return True
    return False


def _user_code() -> str:
    letters = "".join(c for c in string.ascii_uppercase if c not in "AEIOUY")
    raw = "".join(secrets.choice(letters) for _ in range(8))
    return f"{raw[:4]}-{raw[4:]}"
