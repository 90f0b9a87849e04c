"""Stand-in for the AWS SSO portal and its OIDC service (moto has neither).

    python -m dbtunneld.sandbox.sso_standin --config FILE

One HTTP server speaks both services with botocore's wire formats (rest-json), one path prefix
per AWS host, so a client pointed at the wrong region fails as on AWS (the rules, and the real
sources they come from, are in ``sso_oidc``): ``/oidc.<region>`` is
``https://oidc.<region>.amazonaws.com`` and ``/portal.sso.<region>`` is
``https://portal.sso.<region>.amazonaws.com``. dbtunneld's ``aws.endpoint_urls`` take
``{region}`` for this (``http://127.0.0.1:PORT/oidc.{region}``); a plain botocore / AWS CLI
client is given the prefix of the instance's region.

sso-oidc (``/oidc.<region>``)
  ``POST /client/register``       RegisterClient (device, or authorization code with PKCE)
  ``POST /device_authorization``  StartDeviceAuthorization
  ``GET  /authorize``             the browser's sign-in page for the authorization-code grant;
                                  with auto-approve (or after ``POST /authorize/consent``) it
                                  redirects to the loopback ``redirect_uri`` with code + state
  ``POST /token``                 CreateToken: device code, authorization code, refresh token
sso (portal, ``/portal.sso.<region>``)
  ``GET /assignment/accounts``    ListAccounts
  ``GET /assignment/roles``       ListAccountRoles
  ``GET /federation/credentials`` GetRoleCredentials: REAL moto credentials, from
                                  ``sts:AssumeRole`` with the seeded IAM user's keys
  ``POST /logout``                Logout (revokes the access token)
  (all take the access token in ``x-amz-sso_bearer_token``; a missing, expired, revoked or
  other-region one is ``UnauthorizedException``, 401)

A browser-less approval for tests: ``GET /device?user_code=XXXX-XXXX`` (the
``verificationUriComplete``) approves the code, as a user clicking "Allow" would.
Test controls (JSON ``POST``): ``/_standin/approve`` ``{"user_code"}``, ``/_standin/deny``
``{"user_code"}``, ``/_standin/auto-approve`` ``{"enabled"}`` (approve every new device code
and /authorize request at once), ``/_standin/expire-tokens`` (access tokens expire now),
``/_standin/end-sessions`` (the SSO sessions end: refresh tokens expire too),
``/_standin/expire-registrations`` (client secrets expire), ``/_standin/revoke-tokens``;
``GET /_standin/state`` (counts), ``/_standin/health``.

Config file (JSON, ``sso_oidc.SsoConfig``): ``listen_port``, ``region`` (the instance's),
``start_url``, ``seed_file`` (the moto launcher's output), ``accounts``, ``user_name``,
``access_token_ttl`` (3600), ``refresh_token_ttl`` (the SSO session, 8 h),
``registration_ttl`` (90 days), ``device_code_ttl``, ``auth_code_ttl``, ``interval``,
``role_credentials_ttl`` (seconds).
"""

from __future__ import annotations

import argparse
import html
import json
import logging
import re
import sys
import threading
import time
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

from .sso_oidc import (AUTH_CODE_GRANT, DEVICE_GRANT, REFRESH_GRANT, ApiError, SsoConfig, SsoState,  # noqa: F401
                       oidc_error, portal_error)
from .standin_http import Handler, Server, serve, setup_logging

log = logging.getLogger("sso-standin")

_HOST_PREFIX = re.compile(r"^/(oidc|portal\.sso)\.([a-z]{2}(?:-[a-z]+)+-\d)(/.*)$")


def list_accounts(config: SsoConfig) -> dict:
    return {"accountList": [{k: a[k] for k in ("accountId", "accountName", "emailAddress")} for a in config.accounts]}


def find_account(config: SsoConfig, account_id: str) -> dict:
    for acct in config.accounts:
        if acct["accountId"] == account_id:
            return acct
    raise portal_error("ForbiddenException", "No access", 403)


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

    def route(self) -> tuple[str, str, str, dict]:
        """(service, region, path, query): service "oidc" / "portal.sso", or "" at the root."""
        url = urlsplit(self.path)
        query = {k: v[0] for k, v in parse_qs(url.query).items()}
        match = _HOST_PREFIX.match(url.path)
        if match is None:
            return "", "", url.path, query
        return match.group(1), match.group(2), match.group(3), query

    def do_POST(self) -> None:
        service, region, path, query = self.route()
        if service == "portal.sso" and path == "/logout":
            self.read_body()
            self.state.logout(self.headers.get("x-amz-sso_bearer_token", ""))
            return self.send_raw(200, b"", content_type=None)
        if service == "oidc" and path == "/authorize/consent":
            return self._consent()
        if not service and path == "/device":
            return self._device_form()
        routes = self._oidc_routes(region) if service == "oidc" else self._control_routes() if not service else {}
        if path not in routes:
            return self._not_found(path)
        try:
            body = self.read_json()
        except ValueError:
            return self.api_error(oidc_error("InvalidRequestException", "invalid_request", "body is not JSON"))
        self.answer(lambda: routes[path](body))

    def _oidc_routes(self, region: str) -> dict[str, Callable[[dict], dict]]:
        return {
            "/client/register": lambda b: self.state.register_client(b, region),
            "/device_authorization": lambda b: self.state.start_device_authorization(b, self.base_url(), region),
            "/token": lambda b: self.state.create_token(b, region),
        }

    def _control_routes(self) -> dict[str, Callable[[dict], dict]]:
        st = self.state
        return {
            "/_standin/approve": lambda b: {"approved": st.approve(b.get("user_code", ""))},
            "/_standin/deny": lambda b: {"denied": st.approve(b.get("user_code", ""), "denied")},
            "/_standin/auto-approve": self._set_auto_approve,
            "/_standin/expire-tokens": lambda b: {"expired": st.expire_tokens()},
            "/_standin/end-sessions": lambda b: {"ended": st.end_sessions()},
            "/_standin/expire-registrations": lambda b: {"expired": st.expire_registrations()},
            "/_standin/revoke-tokens": lambda b: {"revoked": st.revoke_tokens()},
        }

    def do_GET(self) -> None:
        service, region, path, query = self.route()
        if service == "portal.sso":
            return self._portal(region, path, query)
        if service == "oidc" and path == "/authorize":
            return self._authorize(region, query)
        if service:
            return self._not_found(path)
        if path == "/device":
            return self._device_page(query.get("user_code", ""))
        if path in ("/start", "/start/"):
            return self.send_raw(200, b"<h1>dbtunneld sandbox: AWS access portal (stand-in)</h1>",
                                 content_type="text/html")
        if path == "/_standin/health":
            return self.send_json(200, {"standin": "sso", "ok": True, "region": self.state.config.region})
        if path == "/_standin/state":
            return self.send_json(200, self.state.summary())
        self._not_found(path)

    def _portal(self, region: str, path: str, query: dict) -> None:
        config = self.state.config
        token = self.headers.get("x-amz-sso_bearer_token", "")
        portal = {
            "/assignment/accounts": lambda: list_accounts(config),
            "/assignment/roles": lambda: {"roleList": [{"roleName": r, "accountId": query.get("account_id", "")}
                                                       for r in find_account(config, query.get("account_id", ""))["roles"]]},
            "/federation/credentials": lambda: self._role_credentials(query),
        }
        if path not in portal:
            return self._not_found(path)
        self.answer(lambda: (self.state.check_access_token(token, region), portal[path]())[1])

    def _role_credentials(self, query: dict) -> dict:
        account_id, role = query.get("account_id", ""), query.get("role_name", "")
        if role not in find_account(self.state.config, account_id)["roles"]:
            raise portal_error("ForbiddenException", "No access", 403)
        return self.creds.get(account_id, role)

    def _authorize(self, region: str, query: dict) -> None:
        try:
            request_id = self.state.authorize(query, region)
        except ApiError as exc:
            text = html.escape(f"{exc.code}: {exc.body.get('error_description', '')}")
            return self.send_raw(exc.status, f"<p>Sign-in failed: {text}</p>".encode(), content_type="text/html")
        if self.state.auto_approve:
            return self._redirect(self.state.consent(request_id, True))
        form = (f'<form method="post" action="/oidc.{region}/authorize/consent">'
                f'<input type="hidden" name="request" value="{html.escape(request_id)}">'
                '<button name="allow" value="1">Allow</button><button name="allow" value="0">Deny</button></form>')
        self.send_raw(200, form.encode(), content_type="text/html")

    def _consent(self) -> None:
        form = {k: v[0] for k, v in parse_qs(self.read_body().decode("utf-8", "replace")).items()}
        try:
            target = self.state.consent(form.get("request", ""), form.get("allow") == "1")
        except ApiError as exc:
            return self.send_raw(exc.status, b"<p>Unknown or finished sign-in request.</p>", content_type="text/html")
        self._redirect(target)

    def _redirect(self, location: str) -> None:
        self.send_raw(302, b"", headers=[("Location", location)], content_type=None)

    def _not_found(self, path: str) -> None:
        self.api_error(ApiError(404, "ResourceNotFoundException", {"message": f"no route {path}"}))

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
                                description="stand-in for the AWS SSO portal and OIDC service")
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
