"""Stand-in for the AWS SSO portal and its OIDC device flow (moto has neither).

    python -m dbtunneld.sandbox.sso_standin --config FILE

One HTTP server speaks both services with botocore's wire formats (rest-json), so boto3
clients work with ``endpoint_url`` / ``AWS_ENDPOINT_URL_SSO`` / ``AWS_ENDPOINT_URL_SSO_OIDC``:

sso-oidc
  ``POST /client/register``       RegisterClient -> clientId, clientSecret (90 days)
  ``POST /device_authorization``  StartDeviceAuthorization -> deviceCode, userCode, URIs,
                                  expiresIn, interval
  ``POST /token``                 CreateToken, device-code grant: ``authorization_pending``
                                  until the user code is approved, ``slow_down`` when polled
                                  sooner than ``interval`` after the previous poll,
                                  ``expired_token`` after ``expiresIn``; refresh-token grant
                                  (rotates the refresh token)
sso (portal)
  ``GET /assignment/accounts``    ListAccounts
  ``GET /assignment/roles``       ListAccountRoles
  ``GET /federation/credentials`` GetRoleCredentials: REAL moto credentials, from
                                  ``sts:AssumeRole`` with the seeded IAM user's keys
  ``POST /logout``                Logout (revokes the access token)
  (all take the access token in the ``x-amz-sso_bearer_token`` header; a missing, expired
  or revoked one is ``UnauthorizedException``, 401)

A browser-less approval for tests: ``GET /device?user_code=XXXX-XXXX`` (the
``verificationUriComplete``) approves the code, as a user clicking "Allow" would.
Test controls (JSON ``POST``): ``/_standin/approve`` ``{"user_code"}``, ``/_standin/deny``
``{"user_code"}``, ``/_standin/auto-approve`` ``{"enabled"}`` (approve every new code at
once), ``/_standin/expire-tokens`` (access tokens expire now), ``/_standin/revoke-tokens``
(access and refresh tokens revoked); ``GET /_standin/state`` (counts), ``/_standin/health``.

Config file (JSON): ``listen_port``, ``region``, ``start_url``, ``seed_file`` (the moto
launcher's output: endpoint, account, the user's keys), ``accounts``
(``[{"accountId", "accountName", "emailAddress", "roles": [...]}]``), ``user_name``
(session name of the role credentials), ``access_token_ttl``, ``device_code_ttl``,
``interval``, ``role_credentials_ttl`` (seconds).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import secrets
import string
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from .standin_http import Handler, Server, serve, setup_logging

log = logging.getLogger("sso-standin")

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"
REFRESH_GRANT = "refresh_token"


class ApiError(Exception):
    """An error in AWS's rest-json shape: ``x-amzn-ErrorType`` header plus a JSON body."""

    def __init__(self, status: int, code: str, body: dict) -> None:
        super().__init__(code)
        self.status, self.code, self.body = status, code, body


def oidc_error(code: str, error: str, description: str, status: int = 400) -> ApiError:
    return ApiError(status, code, {"error": error, "error_description": description})


def portal_error(code: str, message: str, status: int) -> ApiError:
    return ApiError(status, code, {"message": message})


@dataclass
class SsoConfig:
    listen_port: int
    start_url: str
    seed_file: str
    accounts: list[dict]
    region: str = "us-east-1"
    user_name: str = "alice@example.com"
    access_token_ttl: int = 8 * 3600
    device_code_ttl: int = 600
    interval: int = 1
    role_credentials_ttl: int = 3600

    @classmethod
    def load(cls, path: Path) -> "SsoConfig":
        return cls(**json.loads(Path(path).read_text()))


@dataclass
class DeviceAuth:
    client_id: str
    user_code: str
    expires_at: float
    interval: float
    status: str = "pending"           # pending | approved | denied | used
    last_poll: float = 0.0


@dataclass
class Token:
    client_id: str
    expires_at: float
    revoked: bool = False


@dataclass
class SsoState:
    """Everything the stand-in remembers (in memory, guarded by one lock)."""

    config: SsoConfig
    clock: Callable[[], float] = time.time
    lock: threading.Lock = field(default_factory=threading.Lock)
    clients: dict[str, str] = field(default_factory=dict)            # clientId -> secret
    devices: dict[str, DeviceAuth] = field(default_factory=dict)     # deviceCode -> auth
    user_codes: dict[str, str] = field(default_factory=dict)         # userCode -> deviceCode
    access: dict[str, Token] = field(default_factory=dict)
    refresh: dict[str, Token] = field(default_factory=dict)
    auto_approve: bool = False

    # -- sso-oidc

    def register_client(self, body: dict) -> dict:
        if not body.get("clientName") or body.get("clientType") != "public":
            raise oidc_error("InvalidRequestException", "invalid_request", "clientName and clientType=public are required")
        client_id, secret = "sandbox-" + secrets.token_urlsafe(16), secrets.token_urlsafe(48)
        now = int(self.clock())
        with self.lock:
            self.clients[client_id] = secret
        return {"clientId": client_id, "clientSecret": secret, "clientIdIssuedAt": now,
                "clientSecretExpiresAt": now + 90 * 86400}

    def _check_client(self, body: dict) -> str:
        client_id = body.get("clientId") or ""
        if self.clients.get(client_id) != body.get("clientSecret") or not client_id:
            raise oidc_error("InvalidClientException", "invalid_client", "Invalid client", 401)
        return client_id

    def start_device_authorization(self, body: dict, base_url: str) -> dict:
        with self.lock:
            client_id = self._check_client(body)
            device_code = secrets.token_urlsafe(32)
            user_code = _user_code()
            self.devices[device_code] = DeviceAuth(client_id, user_code, self.clock() + self.config.device_code_ttl,
                                                   self.config.interval, "approved" if self.auto_approve else "pending")
            self.user_codes[user_code] = device_code
        log.info("device authorization started: user code %s", user_code)
        return {"deviceCode": device_code, "userCode": user_code,
                "verificationUri": f"{base_url}/device",
                "verificationUriComplete": f"{base_url}/device?user_code={user_code}",
                "expiresIn": self.config.device_code_ttl, "interval": self.config.interval}

    def create_token(self, body: dict) -> dict:
        with self.lock:
            client_id = self._check_client(body)
            grant = body.get("grantType")
            if grant == DEVICE_GRANT:
                self._take_device_grant(client_id, body.get("deviceCode") or "")
            elif grant == REFRESH_GRANT:
                self._take_refresh_grant(client_id, body.get("refreshToken") or "")
            else:
                raise oidc_error("UnsupportedGrantTypeException", "unsupported_grant_type", f"grant type {grant!r}")
            return self._issue(client_id)

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

    def _take_refresh_grant(self, client_id: str, refresh_token: str) -> None:
        token = self.refresh.pop(refresh_token, None)
        if token is None or token.revoked or token.client_id != client_id:
            raise oidc_error("InvalidGrantException", "invalid_grant", "Invalid refresh token provided")

    def _issue(self, client_id: str) -> dict:
        access, refresh = "sandbox-at-" + secrets.token_urlsafe(32), "sandbox-rt-" + secrets.token_urlsafe(32)
        ttl = self.config.access_token_ttl
        self.access[access] = Token(client_id, self.clock() + ttl)
        self.refresh[refresh] = Token(client_id, float("inf"))
        return {"accessToken": access, "tokenType": "Bearer", "expiresIn": ttl, "refreshToken": refresh}

    def approve(self, user_code: str, status: str = "approved") -> bool:
        with self.lock:
            auth = self.devices.get(self.user_codes.get(user_code.strip().upper(), ""))
            if auth is None or auth.status not in ("pending", "approved", "denied"):
                return False
            auth.status = status
        log.info("user code %s %s", user_code, status)
        return True

    # -- sso portal

    def check_access_token(self, token: str) -> None:
        with self.lock:
            entry = self.access.get(token or "")
            if entry is None or entry.revoked or self.clock() >= entry.expires_at:
                raise portal_error("UnauthorizedException", "Session token not found or invalid", 401)

    def account(self, account_id: str) -> dict:
        for acct in self.config.accounts:
            if acct["accountId"] == account_id:
                return acct
        raise portal_error("ForbiddenException", "No access", 403)

    def list_accounts(self) -> dict:
        return {"accountList": [{k: a[k] for k in ("accountId", "accountName", "emailAddress")}
                                for a in self.config.accounts]}

    def list_account_roles(self, account_id: str) -> dict:
        acct = self.account(account_id)
        return {"roleList": [{"roleName": r, "accountId": account_id} for r in acct["roles"]]}

    def expire_tokens(self) -> int:
        with self.lock:
            for t in self.access.values():
                t.expires_at = min(t.expires_at, self.clock() - 1)
            return len(self.access)

    def revoke_tokens(self) -> int:
        with self.lock:
            for t in list(self.access.values()) + list(self.refresh.values()):
                t.revoked = True
            return len(self.access) + len(self.refresh)

    def logout(self, token: str) -> None:
        with self.lock:
            if token in self.access:
                self.access[token].revoked = True

    def summary(self) -> dict:
        with self.lock:
            return {"clients": len(self.clients), "device_codes": len(self.devices),
                    "pending": sum(d.status == "pending" for d in self.devices.values()),
                    "access_tokens": len(self.access), "auto_approve": self.auto_approve}


def _user_code() -> str:
    letters = "".join(c for c in string.ascii_uppercase if c not in "AEIOUY")
    raw = "".join(secrets.choice(letters) for _ in range(8))
    return f"{raw[:4]}-{raw[4:]}"


class RoleCredentials:
    """Real role credentials from moto: sts:AssumeRole with the seeded IAM user's keys."""

    def __init__(self, config: SsoConfig) -> None:
        self.config = config
        self._client = None
        self._stamp = 0
        self._lock = threading.Lock()

    def client(self):
        """An STS client with the seeded user's keys; rebuilt when moto was reseeded."""
        with self._lock:
            stamp = Path(self.config.seed_file).stat().st_mtime_ns
            if self._client is None or stamp != self._stamp:
                import boto3

                seed = json.loads(Path(self.config.seed_file).read_text())
                self._client = boto3.client(
                    "sts", endpoint_url=seed["endpoint"], region_name=self.config.region,
                    aws_access_key_id=seed["user"]["access_key_id"],
                    aws_secret_access_key=seed["user"]["secret_access_key"])
                self._stamp = stamp
            return self._client

    def get(self, account_id: str, role_name: str) -> dict:
        creds = self.client().assume_role(
            RoleArn=f"arn:aws:iam::{account_id}:role/{role_name}", RoleSessionName=self.config.user_name,
            DurationSeconds=max(900, self.config.role_credentials_ttl))["Credentials"]
        return {"roleCredentials": {
            "accessKeyId": creds["AccessKeyId"], "secretAccessKey": creds["SecretAccessKey"],
            "sessionToken": creds["SessionToken"],
            "expiration": int((time.time() + self.config.role_credentials_ttl) * 1000)}}


class SsoHandler(Handler):
    server_version = "dbtunneld-sso-standin"
    state: SsoState
    creds: RoleCredentials

    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def do_POST(self) -> None:
        path = urlsplit(self.path).path
        routes = {
            "/client/register": lambda b: self.state.register_client(b),
            "/device_authorization": lambda b: self.state.start_device_authorization(b, self.base_url()),
            "/token": lambda b: self.state.create_token(b),
            "/_standin/approve": lambda b: {"approved": self.state.approve(b.get("user_code", ""))},
            "/_standin/deny": lambda b: {"denied": self.state.approve(b.get("user_code", ""), "denied")},
            "/_standin/auto-approve": self._set_auto_approve,
            "/_standin/expire-tokens": lambda b: {"expired": self.state.expire_tokens()},
            "/_standin/revoke-tokens": lambda b: {"revoked": self.state.revoke_tokens()},
        }
        if path == "/logout":
            self.read_body()
            self.state.logout(self.headers.get("x-amz-sso_bearer_token", ""))
            return self.send_raw(200, b"", content_type=None)
        if path == "/device":
            return self._device_form()
        if path not in routes:
            return self.api_error(ApiError(404, "ResourceNotFoundException", {"message": f"no route {path}"}))
        try:
            body = self.read_json()
        except ValueError:
            return self.api_error(oidc_error("InvalidRequestException", "invalid_request", "body is not JSON"))
        self.answer(lambda: routes[path](body))

    def do_GET(self) -> None:
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        token = self.headers.get("x-amz-sso_bearer_token", "")
        portal = {
            "/assignment/accounts": lambda: self.state.list_accounts(),
            "/assignment/roles": lambda: self.state.list_account_roles(query.get("account_id", "")),
            "/federation/credentials": lambda: self._role_credentials(query),
        }
        if url.path in portal:
            return self.answer(lambda: (self.state.check_access_token(token), portal[url.path]())[1])
        if url.path == "/device":
            return self._device_page(query.get("user_code", ""))
        if url.path in ("/start", "/start/"):
            return self.send_raw(200, b"<h1>dbtunneld sandbox: AWS access portal (stand-in)</h1>",
                                 content_type="text/html")
        if url.path == "/_standin/health":
            return self.send_json(200, {"standin": "sso", "ok": True})
        if url.path == "/_standin/state":
            return self.send_json(200, self.state.summary())
        self.api_error(ApiError(404, "ResourceNotFoundException", {"message": f"no route {url.path}"}))

    def _role_credentials(self, query: dict) -> dict:
        account_id, role = query.get("account_id", ""), query.get("role_name", "")
        if role not in self.state.account(account_id)["roles"]:
            raise portal_error("ForbiddenException", "No access", 403)
        return self.creds.get(account_id, role)

    def _set_auto_approve(self, body: dict) -> dict:
        self.state.auto_approve = bool(body.get("enabled", True))
        return {"auto_approve": self.state.auto_approve}

    def _device_page(self, user_code: str) -> None:
        if not user_code:
            form = ('<form method="post" action="/device"><input name="user_code">'
                    '<button>Allow</button></form>')
            return self.send_raw(200, form.encode(), content_type="text/html")
        ok = self.state.approve(user_code)
        text = f"Request {html.escape(user_code)} approved; you may close this window." if ok else "Unknown or expired code."
        self.send_raw(200 if ok else 404, f"<p>{text}</p>".encode(), content_type="text/html")

    def _device_form(self) -> None:
        form = parse_qs(self.read_body().decode("utf-8", "replace"))
        self._device_page((form.get("user_code") or [""])[0])

    def answer(self, produce: Callable[[], dict]) -> None:
        try:
            self.send_json(200, produce())
        except ApiError as exc:
            self.api_error(exc)

    def api_error(self, exc: ApiError) -> None:
        self.send_json(exc.status, exc.body, headers=[("x-amzn-ErrorType", exc.code)])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dbtunneld.sandbox.sso_standin",
                                description="stand-in for the AWS SSO portal and OIDC device flow")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    config = SsoConfig.load(args.config)
    SsoHandler.state = SsoState(config)
    SsoHandler.creds = RoleCredentials(config)
    server = Server(("127.0.0.1", config.listen_port), SsoHandler)
    return serve(server, "sso-standin")


if __name__ == "__main__":
    sys.exit(main())
