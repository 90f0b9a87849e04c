"""Stand-in for Vault's aws auth method (IAM login), in front of a real OpenBao.

    python -m dbtunneld.sandbox.aws_auth_standin --config FILE

OpenBao's PyPI wheel has no aws auth plugin, so this HTTP front serves
``POST /v1/auth/<mount>/login`` itself and passes every other request to OpenBao unchanged
(method, path, headers, status, body; keep-alive and TCP_NODELAY on both sides).

A login is checked the way the real plugin checks it (same order, same error texts,
HTTP 400 with ``{"errors": [...]}``):

1. ``iam_http_request_method`` must be POST; ``iam_request_url`` must have no query;
   ``iam_request_body`` may hold only ``Action=GetCallerIdentity`` and ``Version``;
   ``iam_request_headers`` must be present.
2. If a server-id value is configured, the ``X-Vault-AWS-IAM-Server-ID`` header must be
   present, equal to it, and listed in the Authorization header's SignedHeaders; other
   ``X-Amz-*`` headers must be on the allowed list.
3. The STS endpoint is picked as Vault picks it (``sts_endpoint``, or with
   ``use_sts_region_from_client`` the region of the client's credential scope), and what AWS
   would refuse there is refused (``sts_endpoint.py``: the credential scope's region must be the
   endpoint's region and the signed Host one of its names; path_login.go ``pathLoginUpdateIam``,
   ``buildHttpRequest``, ``submitCallerIdentityRequest``). The request then goes to moto (the
   ``sts_transport`` address stands for that endpoint) as ``endpoint path + "/" + RequestURI``
   with the client's Host header, exactly as signed; moto verifies the SigV4 signature with the
   region of the credential scope and the Host it receives. The answer must be 200 with
   ``Content-Type: text/xml`` and exactly one identity.
4. ``arn:aws:sts::ACCT:assumed-role/NAME/SESSION`` maps to ``arn:aws:iam::ACCT:role/NAME``;
   the requested role (or, if none, the principal's friendly name) must exist and bind that
   ARN (exact, or a glob ending in ``*``) in ``bound_iam_principal_arn``.

Namespaces: the aws mount lives in ``namespace`` (Vault Enterprise / OpenBao). A login is
served only at that namespace's path, from the ``X-Vault-Namespace`` header joined with a path
prefix as Vault routes them (``/v1/auth/aws/login`` + header ``team-a``, or
``/v1/team-a/auth/aws/login``); anything else goes to OpenBao unchanged, which answers for
its own mounts.

Then the stand-in signs a short-lived JWT (its own ES256 key) naming the canonical ARN, and
logs in with it at OpenBao's JWT auth mount (mounted at the same path, e.g. ``auth/aws``),
whose role of the same name checks the claims and carries the policies and TTLs; the
OpenBao token response is returned as is. ``GET /_standin/health`` answers locally.

Config file (JSON, mode 0600): ``listen_port``, ``vault_addr``, ``sts_transport`` (moto),
``sts_endpoint``, ``sts_region``, ``use_sts_region_from_client`` (as Vault's config/client),
``namespace``, ``iam_server_id_header_value``, ``auth_mount``, ``jwt_key_file``, ``jwt_issuer``,
``jwt_audience``, ``allowed_sts_header_values`` and ``roles`` (name ->
``{"bound_iam_principal_arn": [...]}``).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import http.client
import json
import logging
import re
import socket
import sys
import threading
import time
import uuid
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

from . import sts_endpoint as sts
from .standin_http import Handler, Server, serve, setup_logging

log = logging.getLogger("aws-auth-standin")

SERVER_ID_HEADER = "X-Vault-AWS-IAM-Server-ID"
DEFAULT_ALLOWED_STS_HEADERS = (
    "X-Amz-Algorithm", "X-Amz-Content-Sha256", "X-Amz-Credential", "X-Amz-Date",
    "X-Amz-Security-Token", "X-Amz-Signature", "X-Amz-SignedHeaders", "X-Amz-User-Agent",
)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer",
              "upgrade", "host", "content-length"}


class LoginRefused(Exception):
    """The login is refused; ``status`` and ``message`` are what Vault would answer."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Identity:
    """The caller as STS reports it, and the canonical ARN Vault matches bindings against."""

    arn: str
    user_id: str
    account: str
    kind: str
    friendly_name: str
    partition: str

    @property
    def canonical_arn(self) -> str:
        kind = "role" if self.kind == "assumed-role" else self.kind
        return f"arn:{self.partition}:iam::{self.account}:{kind}/{self.friendly_name}"


@dataclass
class StandinConfig:
    listen_port: int
    vault_addr: str
    sts_transport: str
    jwt_key_file: str
    roles: dict[str, dict]
    sts_endpoint: str = sts.GLOBAL_ENDPOINT
    sts_region: str = ""
    use_sts_region_from_client: bool = False
    namespace: str = ""
    iam_server_id_header_value: str = ""
    auth_mount: str = "aws"
    jwt_issuer: str = "dbtunneld-sandbox-aws-auth-standin"
    jwt_audience: str = "openbao-aws-auth-standin"
    allowed_sts_header_values: list[str] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> "StandinConfig":
        return cls(**json.loads(Path(path).read_text()))


# ------------------------------------------------------------ request checks (pure)

def _b64(data: dict, key: str) -> str:
    raw = data.get(key) or ""
    if not raw:
        raise LoginRefused(f"missing {key}")
    try:
        return base64.b64decode(raw, validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise LoginRefused(f"failed to base64 decode {key}") from None


def validate_body(body: str) -> None:
    """Only ``Action=GetCallerIdentity`` and ``Version`` may be in the signed body."""
    for key, values in parse_qs(body, keep_blank_values=True).items():
        if key == "Action":
            if values != ["GetCallerIdentity"]:
                raise LoginRefused("iam request body is invalid")
        elif key != "Version":
            raise LoginRefused("iam request body is invalid")


def parse_headers(raw) -> list[tuple[str, list[str]]]:
    """``iam_request_headers``: a JSON object, or base64 of one; values a string or a list
    (path_login.go ``parseIamRequestHeaders``)."""
    if isinstance(raw, str):
        text = raw
        try:
            text = base64.b64decode(raw, validate=True).decode("utf-8")
        except (binascii.Error, ValueError):
            pass
        try:
            raw = json.loads(text)
        except ValueError:
            raise LoginRefused("failed to parse iam_request_headers") from None
    if not isinstance(raw, dict) or not raw:
        raise LoginRefused("missing iam_request_headers")
    out = []
    for k, v in raw.items():
        values = v if isinstance(v, list) else [v]
        if not all(isinstance(x, (str, int, float)) for x in values):
            raise LoginRefused(f"header {k!r} has a value that is not a string")
        out.append((str(k), [str(x) for x in values]))
    return out


def _header(headers: list[tuple[str, list[str]]], name: str) -> list[str] | None:
    for k, v in headers:
        if k.lower() == name.lower():
            return v
    return None


def canonical_header_name(name: str) -> str:
    return "-".join(part[:1].upper() + part[1:].lower() for part in name.split("-"))


def validate_server_id(headers: list[tuple[str, list[str]]], required: str) -> None:
    """Present, equal, and signed (listed in SignedHeaders), as the plugin checks."""
    values = _header(headers, SERVER_ID_HEADER)
    provided = ",".join(values) if values else ""
    where = f"error validating {SERVER_ID_HEADER} header"
    if not provided:
        raise LoginRefused(f'{where}: missing header "{SERVER_ID_HEADER}"')
    if provided != required:
        raise LoginRefused(f'{where}: expected "{required}" but got "{provided}"')
    authz = _header(headers, "Authorization")
    if authz is None:
        raise LoginRefused(f"{where}: missing Authorization header")
    match = re.search(r".*SignedHeaders=([^,]+)", ",".join(authz))
    if not match:
        raise LoginRefused(f"{where}: vault header wasn't signed")
    if SERVER_ID_HEADER.lower() not in match.group(1).split(";"):
        raise LoginRefused(f"{where}: vault header wasn't signed")


def validate_sts_headers(headers: list[tuple[str, list[str]]], extra_allowed: list[str]) -> None:
    allowed = set(DEFAULT_ALLOWED_STS_HEADERS) | {canonical_header_name(h) for h in extra_allowed}
    for k, _ in headers:
        canon = canonical_header_name(k)
        if canon == "X-Amz-Signedheaders":
            canon = "X-Amz-SignedHeaders"
        if canon.startswith("X-Amz-") and canon not in allowed:
            raise LoginRefused(f"invalid request header: {k}")


def parse_arn(arn: str, user_id: str, account: str) -> Identity:
    """Split an STS ARN into its parts (user, role, assumed-role, instance-profile)."""
    parts = arn.split(":", 5)
    if len(parts) != 6 or parts[0] != "arn":
        raise LoginRefused(f'error parsing arn "{arn}": unrecognized arn')
    if parts[2] not in ("iam", "sts"):
        raise LoginRefused(f'error parsing arn "{arn}": unrecognized service {parts[2]}')
    pieces = parts[5].split("/")
    if len(pieces) < 2:
        raise LoginRefused(f'error parsing arn "{arn}": too few slash-separated parts')
    kind = pieces[0]
    if kind not in ("assumed-role", "user", "role", "instance-profile"):
        raise LoginRefused(f'error parsing arn "{arn}": unrecognized principal type: "{kind}"')
    name = pieces[1] if kind == "assumed-role" else pieces[-1]
    return Identity(arn=arn, user_id=user_id, account=parts[4], kind=kind, friendly_name=name,
                    partition=parts[1])


def principal_matches(bound: list[str], identity: Identity) -> bool:
    """Exact canonical-ARN match, or a binding that ends in ``*`` matching as a glob."""
    if identity.canonical_arn in bound:
        return True
    return any(b.endswith("*") and fnmatchcase(identity.canonical_arn, b) for b in bound)


def parse_caller_identity(xml_text: str) -> tuple[str, str, str]:
    """(Arn, UserId, Account) from a GetCallerIdentity XML answer."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError:
        raise LoginRefused("error making upstream request: error parsing STS response") from None
    results = [el for el in root.iter() if el.tag.endswith("GetCallerIdentityResult")]
    if len(results) != 1:
        raise LoginRefused(f"received {len(results)} identities in STS response but expected 1")

    def text(tag: str) -> str:
        return next((el.text or "" for el in results[0] if el.tag.endswith(tag)), "")

    return text("Arn"), text("UserId"), text("Account")


# ------------------------------------------------------------ the login

class Login:
    """Checks one login request and turns it into an OpenBao token."""

    def __init__(self, config: StandinConfig, jwt_key) -> None:
        self.config = config
        self.jwt_key = jwt_key

    def check(self, data: dict) -> tuple[str, Identity]:
        """Run every check; return (role name, identity) or raise LoginRefused."""
        method = data.get("iam_http_request_method") or ""
        if not method:
            raise LoginRefused("missing iam_http_request_method")
        if method != "POST":
            raise LoginRefused("invalid iam_http_request_method; currently only 'POST' is supported")
        url = urlsplit(_b64(data, "iam_request_url"))
        if url.query:
            raise LoginRefused("invalid request")
        body = _b64(data, "iam_request_body")
        validate_body(body)
        headers = parse_headers(data.get("iam_request_headers") or {})
        if self.config.iam_server_id_header_value:
            validate_server_id(headers, self.config.iam_server_id_header_value)
        validate_sts_headers(headers, self.config.allowed_sts_header_values)
        identity = self.caller_identity(url, body, headers)
        role = data.get("role") or identity.friendly_name
        self.check_binding(role, identity)
        return role, identity

    def sts_target(self, url, headers: list[tuple[str, list[str]]]) -> sts.StsTarget:
        """The endpoint Vault would use, refusing what AWS would refuse there."""
        cfg = self.config
        authorization = ",".join(_header(headers, "Authorization") or [])
        try:
            target = sts.vault_target(cfg.sts_endpoint, cfg.sts_region, cfg.use_sts_region_from_client, authorization)
            sts.check_accepts(target, url.hostname or "", authorization)
        except ValueError as exc:
            raise LoginRefused(str(exc)) from None
        except sts.StsRefusal as exc:
            raise LoginRefused(f"error making upstream request: {exc}") from None
        return target

    def caller_identity(self, url, body: str, headers: list[tuple[str, list[str]]]) -> Identity:
        """Send the signed request to STS exactly as the plugin does and parse the answer."""
        target = urlsplit(self.sts_target(url, headers).endpoint)
        transport = urlsplit(self.config.sts_transport)
        request_uri = (url.path or "/") + (f"?{url.query}" if url.query else "")
        conn = http.client.HTTPConnection(transport.hostname, transport.port or 80, timeout=15)
        try:
            conn.putrequest("POST", f"{target.path.rstrip('/')}/{request_uri}", skip_host=True,
                            skip_accept_encoding=True)
            conn.putheader("Host", url.netloc)
            for k, values in headers:
                if k.lower() not in ("host", "content-length"):
                    for v in values:
                        conn.putheader(k, v)
            payload = body.encode()
            conn.putheader("Content-Length", str(len(payload)))
            conn.endheaders(payload)
            resp = conn.getresponse()
            answer = resp.read().decode("utf-8", "replace")
        except OSError as exc:
            raise LoginRefused(f"error making upstream request: error making request: {exc}") from None
        finally:
            conn.close()
        if resp.status != 200:
            raise LoginRefused(f"error making upstream request: received error code {resp.status} from STS: {answer}")
        ctype = resp.getheader("Content-Type") or ""
        if not ctype.split(";")[0].strip().lower() == "text/xml":
            raise LoginRefused(f"error making upstream request: unexpected Content-Type {ctype!r} from STS")
        arn, user_id, account = parse_caller_identity(answer)
        return parse_arn(arn, user_id, account)

    def check_binding(self, role: str, identity: Identity) -> None:
        entry = self.config.roles.get(role)
        if entry is None:
            raise LoginRefused(f"entry for role {role} not found")
        bound = entry.get("bound_iam_principal_arn") or []
        if bound and not principal_matches(bound, identity):
            raise LoginRefused(f'IAM Principal "{identity.arn}" does not belong to the role "{role}"')

    def jwt_for(self, identity: Identity) -> str:
        import jwt

        now = int(time.time())
        claims = {
            "iss": self.config.jwt_issuer, "aud": self.config.jwt_audience, "sub": identity.canonical_arn,
            "iat": now, "nbf": now - 5, "exp": now + 60, "jti": str(uuid.uuid4()),
            "friendly_name": identity.friendly_name, "canonical_arn": identity.canonical_arn,
            "client_arn": identity.arn, "account_id": identity.account,
            "client_user_id": identity.user_id.split(":")[0], "auth_type": "iam",
        }
        return jwt.encode(claims, self.jwt_key, algorithm="ES256")


# ------------------------------------------------------------ HTTP

class _Upstream(threading.local):
    conn: http.client.HTTPConnection | None = None


class StandinHandler(Handler):
    server_version = "dbtunneld-aws-auth-standin"
    login: Login
    upstream = _Upstream()

    def do_any(self) -> None:
        path = self.path.split("?", 1)[0]
        if path == "/_standin/health":
            return self.send_json(200, {"standin": "aws-auth", "ok": True})
        if self.is_login(path) and self.command in ("POST", "PUT"):
            return self.handle_login()
        self.proxy(self.read_body())

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = do_LIST = do_OPTIONS = do_any

    def is_login(self, path: str) -> bool:
        """Vault's routing: the namespace header joined with the path after /v1/."""
        if not path.startswith("/v1/"):
            return False
        header = (self.headers.get("X-Vault-Namespace") or "").strip("/")
        routed = "/".join(p for p in (header, path[len("/v1/"):].strip("/")) if p)
        cfg = self.login.config
        return routed == "/".join(p for p in (cfg.namespace.strip("/"), f"auth/{cfg.auth_mount}/login") if p)

    def handle_login(self) -> None:
        try:
            data = self.read_json()
            if not isinstance(data, dict):
                raise ValueError("not an object")
        except ValueError:
            return self.send_json(400, {"errors": ["failed to parse JSON input"]})
        try:
            role, identity = self.login.check(data)
        except LoginRefused as exc:
            log.info("login refused: %s", exc)
            return self.send_json(exc.status, {"errors": [str(exc)]})
        body = json.dumps({"role": role, "jwt": self.login.jwt_for(identity)}).encode()
        log.info("login accepted: %s as role %s", identity.arn, role)
        self.path = f"/v1/auth/{self.login.config.auth_mount}/login"
        self.command = "POST"
        extra = {"Content-Type": "application/json"}
        if self.login.config.namespace:
            extra["X-Vault-Namespace"] = self.login.config.namespace
        self.proxy(body, extra_headers=extra, drop_token=True)

    def proxy(self, body: bytes, extra_headers: dict | None = None, drop_token: bool = False) -> None:
        headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
        if drop_token:  # the JWT login: no client token, and the namespace is the stand-in's
            headers = {k: v for k, v in headers.items() if k.lower() not in ("x-vault-token", "x-vault-namespace")}
        headers.update(extra_headers or {})
        headers["Content-Length"] = str(len(body))
        try:
            status, resp_headers, payload = self._forward(body, headers)
        except OSError as exc:
            return self.send_json(502, {"errors": [f"aws auth stand-in: OpenBao unreachable: {exc}"]})
        self.send_response(status)
        for k, v in resp_headers:
            if k.lower() not in HOP_BY_HOP:
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _forward(self, body: bytes, headers: dict) -> tuple[int, list, bytes]:
        for attempt in (1, 2):
            conn, reused = self._connection()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                payload = resp.read()
                if resp.will_close:
                    self._drop()
                return resp.status, resp.getheaders(), payload
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
                self._drop()
                if not reused or attempt == 2:
                    raise
            except OSError:
                self._drop()
                raise
        raise OSError("unreachable")

    def _connection(self) -> tuple[http.client.HTTPConnection, bool]:
        if self.upstream.conn is not None:
            return self.upstream.conn, True
        target = urlsplit(self.login.config.vault_addr)
        conn = http.client.HTTPConnection(target.hostname, target.port or 80, timeout=60)
        conn.connect()
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.upstream.conn = conn
        return conn, False

    def _drop(self) -> None:
        if self.upstream.conn is not None:
            self.upstream.conn.close()
            self.upstream.conn = None


def load_jwt_key(path: str):
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(Path(path).read_bytes(), password=None)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dbtunneld.sandbox.aws_auth_standin",
                                description="stand-in for Vault's aws auth method in front of OpenBao")
    p.add_argument("--config", type=Path, required=True)
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    config = StandinConfig.load(args.config)
    StandinHandler.login = Login(config, load_jwt_key(config.jwt_key_file))
    server = Server(("127.0.0.1", config.listen_port), StandinHandler)
    return serve(server, "aws-auth-standin")


if __name__ == "__main__":
    sys.exit(main())
