"""Vault through hvac: AWS IAM login, token lookup / renew / revoke, database credentials, leases.

An adapter: each method is one request, without retries (hvac has none and urllib3's are switched
off here), so the keepers in ``lease`` own every retry. ``classify`` is the one place that turns
hvac and requests failures into dbtunneld's errors:

* ``TransientError``: unreachable, timeout, sealed / standby / 5xx, rate limited: retry later.
* ``PermissionDeniedError``: 401/403 (a bad or expired token, or a policy / role binding that
  does not allow the request) and a refused login.
* ``VaultRequestError``: 400/404, the request names something Vault does not know (unknown
  role or mount, lease not found): re-acquire or fix the config.
* ``NeedsUserError``: TLS verification failed (set ``vault.ca_cert``).
* ``RevokeDeniedError``: a 403 on ``sys/leases/revoke`` (the policy lacks it, as Vault's default
  policy does): final for that lease, never retried; the hint names the policy line to add.
* A bug (AttributeError, TypeError, KeyError... ``errors.is_bug``) is not classified: it propagates
  unchanged, traceback and all, to the keeper loop (never disguised as a transient failure).

Vault's environment, as its CLI reads it: ``VAULT_NAMESPACE``, ``VAULT_CACERT`` and
``VAULT_CAPATH`` stand in for ``vault.namespace`` / ``vault.ca_cert`` when those are unset;
``VAULT_TOKEN`` and ``~/.vault-token`` are never read (the token is only what our login made).

Secrets: the token travels only in the ``X-Vault-Token`` header; ``Token`` and ``LeaseGrant``
never show their secret in ``repr``.
"""

from __future__ import annotations

import math
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Iterator, Mapping

import hvac
import hvac.exceptions as hexc
import requests
from requests.adapters import HTTPAdapter

from ..core.config import VaultConfig
from ..core.errors import DbtunneldError, NeedsUserError, PermissionDeniedError, TransientError, reraise_if_bug
from ..core.timing import SYSTEM_CLOCK, Clock
from . import iam_login
from . import log as dlog

_TRANSIENT_HTTP = (hexc.InternalServerError, hexc.BadGateway, hexc.VaultDown, hexc.RateLimitExceeded,
                   hexc.VaultNotInitialized, hexc.UnexpectedError)


class VaultRequestError(DbtunneldError):
    """Vault rejected the request itself (400/404): an unknown role, mount or lease."""


REVOKE_POLICY_LINE = 'path "sys/leases/revoke" { capabilities = ["update"] }'


class RevokeDeniedError(PermissionDeniedError):
    """Vault's policy does not let this token revoke leases (403 on ``sys/leases/revoke``)."""

    hint = f"ask your Vault admin to add {REVOKE_POLICY_LINE} to the policy of your Vault role"


@dataclass(frozen=True)
class TokenInfo:
    """What Vault says about a token (no secret in here). Times are epoch seconds."""

    accessor: str
    ttl: float                       # seconds left when asked; 0 = never expires
    renewable: bool
    creation_ttl: float              # what a renewal asks for
    issued_at: float
    expires_at: float                # math.inf when it never expires
    explicit_max_ttl: float = 0.0
    policies: tuple[str, ...] = ()
    display_name: str = ""

    @property
    def explicit_max_expires_at(self) -> float | None:
        return self.issued_at + self.explicit_max_ttl if self.explicit_max_ttl > 0 else None


@dataclass(frozen=True)
class Token:
    """A Vault token and what is known about it."""

    secret: str = field(repr=False)
    info: TokenInfo


@dataclass(frozen=True)
class LeaseGrant:
    """New database credentials with their lease (the password is never shown by repr)."""

    lease_id: str
    duration: float
    renewable: bool
    username: str
    password: str = field(repr=False)
    issued_at: float = 0.0


@dataclass(frozen=True)
class LeaseRenewal:
    lease_id: str
    duration: float
    renewable: bool


def classify(exc: BaseException, doing: str, address: str) -> DbtunneldError:
    """The dbtunneld error for a failure of ``doing`` against Vault at ``address``."""
    if isinstance(exc, DbtunneldError):
        return exc
    reraise_if_bug(exc)
    if isinstance(exc, requests.exceptions.SSLError):
        return NeedsUserError(f"Vault at {address}: TLS verification failed while {doing}",
                              hint="set vault.ca_cert to the PEM file of Vault's CA (or fix the system trust store)")
    if isinstance(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout)):
        return TransientError(f"Vault at {address} is unreachable while {doing} ({type(exc).__name__})",
                              hint="check the network or VPN; dbtunneld keeps retrying")
    if isinstance(exc, (hexc.Forbidden, hexc.Unauthorized)):
        return PermissionDeniedError(f"Vault refused {doing}: {_vault_message(exc)}",
                                     hint="check that your Vault policy allows it, or sign in again")
    if isinstance(exc, (hexc.InvalidRequest, hexc.InvalidPath, hexc.UnsupportedOperation)):
        return VaultRequestError(f"Vault rejected {doing}: {_vault_message(exc)}",
                                 hint="check the role and mount names in the [vault] and [[clusters]] config")
    if isinstance(exc, _TRANSIENT_HTTP) or isinstance(exc, hexc.VaultError):
        return TransientError(f"Vault failed while {doing}: {_vault_message(exc)}",
                              hint="Vault is sealed, restarting or overloaded; dbtunneld keeps retrying")
    if isinstance(exc, (requests.exceptions.RequestException, ValueError)):
        return TransientError(f"Vault at {address}: bad response while {doing} ({type(exc).__name__})",
                              hint="a proxy in between may be failing; dbtunneld keeps retrying")
    return TransientError(f"unexpected failure while {doing}: {type(exc).__name__}: {exc}")


def _login_hint(cfg: VaultConfig, region: str) -> str:
    signed = iam_login.sts_url(region, cfg.sts_endpoint)
    return (f"check that your AWS role is bound to Vault role {cfg.role!r}, that vault.iam_server_id matches "
            f"the server's iam_server_id_header_value, and that the server's STS endpoint takes a request "
            f"signed for {region} at {signed} (set vault.sts_region / vault.sts_endpoint like its "
            "sts_region / sts_endpoint)" + (f"; namespace {cfg.namespace!r}" if cfg.namespace else ""))


def tls_verify(config: VaultConfig, environ: Mapping[str, str] = os.environ) -> bool | str:
    """What to trust for Vault's TLS: ``vault.ca_cert``, else ``VAULT_CACERT``, else
    ``VAULT_CAPATH`` (a directory of hashed CA files), else the system store."""
    return config.ca_cert or environ.get("VAULT_CACERT") or environ.get("VAULT_CAPATH") or True


def vault_namespace(config: VaultConfig, environ: Mapping[str, str] = os.environ) -> str:
    """``vault.namespace``, else ``VAULT_NAMESPACE`` (Vault Enterprise / HCP), else the root."""
    return (config.namespace or environ.get("VAULT_NAMESPACE", "")).strip("/")


def _vault_message(exc: BaseException) -> str:
    errors = getattr(exc, "errors", None)
    if errors:
        return "; ".join(str(e) for e in errors)[:300]
    return (str(exc.args[0]) if exc.args and exc.args[0] else type(exc).__name__)[:300]


def parse_time(text: str | None) -> float | None:
    """Vault's RFC 3339 times (nanoseconds, ``Z``) as epoch seconds."""
    if not text:
        return None
    text = text.strip().replace("Z", "+00:00")
    if "." in text:
        head, rest = text.split(".", 1)
        digits = "".join(ch for ch in rest if ch.isdigit())
        zone = rest[len(digits):]
        text = f"{head}.{digits[:6]}{zone}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


class RequestCounter:
    """Answers this process received from Vault, all clients together (read by the benchmarks)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0

    def count(self, *_args: Any, **_kwargs: Any) -> None:
        with self._lock:
            self.total += 1


REQUESTS = RequestCounter()


def _no_retry_session(verify: bool | str) -> requests.Session:
    session = requests.Session()
    adapter = HTTPAdapter(max_retries=0)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    session.verify = verify
    session.hooks["response"].append(REQUESTS.count)
    return session


class VaultClient:
    """One Vault endpoint as dbtunneld uses it. Not thread-safe: one per keeper thread."""

    def __init__(self, config: VaultConfig, token: str | None = None, *, clock: Clock = SYSTEM_CLOCK,
                 environ: Mapping[str, str] = os.environ) -> None:
        self.config = config
        self._clock = clock
        verify = tls_verify(config, environ)
        self.namespace = vault_namespace(config, environ)
        self._session = _no_retry_session(verify)
        dlog.register_secret(token)
        # token "" (not None): hvac would otherwise pick up VAULT_TOKEN or ~/.vault-token
        self._client = hvac.Client(url=config.address, token=token or "", timeout=config.timeout,
                                   verify=verify, session=self._session, namespace=self.namespace or None)

    @property
    def address(self) -> str:
        return self.config.address

    def use_token(self, token: str | None) -> None:
        dlog.register_secret(token)
        self._client.token = token or ""

    def close(self) -> None:
        self._session.close()

    def __enter__(self) -> "VaultClient":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @contextmanager
    def _classified(self, doing: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:
            raise classify(exc, doing, self.address) from None

    # -- auth

    def login_aws_iam(self, access_key: str, secret_key: str, session_token: str | None, *,
                      profile_region: Callable[[], str] = str) -> Token:
        """Log in with the aws auth method: a GetCallerIdentity signed for ``vault.sts_region``
        (``auto``: ``profile_region()``, the AWS profile's region) at ``vault.sts_endpoint`` or
        that region's STS host (see ``iam_login``), which Vault replays to its own STS endpoint."""
        cfg = self.config
        region = iam_login.signing_region(cfg, profile_region)
        doing = f"the AWS IAM login (auth mount {cfg.auth_mount!r}, role {cfg.role!r})"
        payload = iam_login.login_payload(access_key, secret_key, session_token, region=region,
                                          endpoint=cfg.sts_endpoint, server_id=cfg.iam_server_id, role=cfg.role)
        try:
            resp = self._client.login(f"/v1/auth/{cfg.auth_mount}/login", use_token=True, json=payload)
        except (hexc.InvalidRequest, hexc.Forbidden, hexc.Unauthorized) as exc:
            raise PermissionDeniedError(
                f"Vault refused {doing}: {_vault_message(exc)}",
                hint=_login_hint(cfg, region)) from None
        except Exception as exc:
            raise classify(exc, doing, self.address) from None
        return self._token_from_auth(resp["auth"])

    def _token_from_auth(self, auth: dict[str, Any]) -> Token:
        now = self._clock.time()
        ttl = float(auth.get("lease_duration") or 0)
        dlog.register_secret(auth["client_token"])
        info = TokenInfo(accessor=auth.get("accessor", ""), ttl=ttl, renewable=bool(auth.get("renewable")),
                         creation_ttl=ttl, issued_at=now, expires_at=now + ttl if ttl > 0 else math.inf,
                         policies=tuple(auth.get("policies") or ()))
        return Token(secret=auth["client_token"], info=info)

    def lookup_self(self) -> TokenInfo:
        with self._classified("looking up the token"):
            data = self._client.auth.token.lookup_self()["data"]
        now = self._clock.time()
        ttl = float(data.get("ttl") or 0)
        return TokenInfo(
            accessor=data.get("accessor", ""), ttl=ttl, renewable=bool(data.get("renewable")),
            creation_ttl=float(data.get("creation_ttl") or ttl),
            issued_at=parse_time(data.get("issue_time")) or float(data.get("creation_time") or now),
            expires_at=now + ttl if ttl > 0 else math.inf,
            explicit_max_ttl=float(data.get("explicit_max_ttl") or 0),
            policies=tuple(data.get("policies") or ()), display_name=data.get("display_name", ""))

    def renew_self(self, increment: float) -> tuple[float, bool]:
        """Renew the token by ``increment`` seconds; returns (granted TTL, still renewable)."""
        with self._classified("renewing the token"):
            auth = self._client.auth.token.renew_self(increment=f"{max(1, int(increment))}s")["auth"]
        return float(auth.get("lease_duration") or 0), bool(auth.get("renewable"))

    def revoke_self(self) -> None:
        with self._classified("revoking the token"):
            self._client.auth.token.revoke_self()

    # -- database credentials and leases

    def database_creds(self, role: str) -> LeaseGrant:
        mount = self.config.database_mount
        try:
            with self._classified(f"reading {mount}/creds/{role}"):
                resp = self._client.secrets.database.generate_credentials(name=role, mount_point=mount)
        except VaultRequestError as exc:
            raise VaultRequestError(exc.message, hint=f"check the cluster's db_role ({role!r}) and "
                                    f"vault.database_mount ({mount!r}) against Vault") from None
        data = resp.get("data") or {}
        dlog.register_secret(data.get("password"))
        return LeaseGrant(lease_id=resp["lease_id"], duration=float(resp.get("lease_duration") or 0),
                          renewable=bool(resp.get("renewable")), username=data["username"],
                          password=data["password"], issued_at=self._clock.time())

    def list_database_roles(self) -> list[str]:
        """The role names under the database mount (LIST ``<mount>/roles``); a policy that does not
        grant ``list`` there raises PermissionDeniedError (a 403 is an answer: ask the user)."""
        mount = self.config.database_mount
        with self._classified(f"listing {mount}/roles"):
            try:
                resp = self._client.secrets.database.list_roles(mount_point=mount)
            except hexc.InvalidPath:
                return []            # Vault answers 404 for a LIST with no entries
        return sorted(str(k) for k in (resp.get("data") or {}).get("keys", []))

    def renew_lease(self, lease_id: str, increment: float) -> LeaseRenewal:
        with self._classified(f"renewing lease {lease_id}"):
            resp = self._client.sys.renew_lease(lease_id=lease_id, increment=max(1, int(increment)))
        return LeaseRenewal(lease_id=resp.get("lease_id", lease_id),
                            duration=float(resp.get("lease_duration") or 0),
                            renewable=bool(resp.get("renewable")))

    def revoke_lease(self, lease_id: str) -> None:
        """Revoke one lease; ``RevokeDeniedError`` when the policy does not allow it."""
        try:
            with self._classified(f"revoking lease {lease_id}"):
                self._client.sys.revoke_lease(lease_id=lease_id)
        except PermissionDeniedError as exc:
            raise RevokeDeniedError(f"Vault's policy does not allow revoking lease {lease_id} "
                                    f"(403 on sys/leases/revoke: {exc.message})") from None

    def lease_expires_at(self, lease_id: str) -> float | None:
        """When the lease ends on its own (``sys/leases/lookup``, in Vault's default policy)."""
        with self._classified(f"looking up lease {lease_id}"):
            data = self._client.sys.read_lease(lease_id=lease_id).get("data") or {}
        return parse_time(data.get("expire_time"))

