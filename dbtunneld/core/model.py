"""Status vocabulary shared by the engine, the daemon and its clients (CLI, tray).

Plain frozen dataclasses that round-trip through JSON (``to_dict`` / ``from_dict``), so the
control protocol carries them unchanged and the menu model can be tested from literals.
Times are wall-clock epoch seconds (floats) so clients in other processes can show them.
"""

from __future__ import annotations

import enum
from dataclasses import asdict, dataclass, field, fields
from typing import Any


@dataclass(frozen=True)
class DbCredentials:
    """A cluster's DB user as the engine hands it out; the password stays in memory and ``repr``
    never shows it."""

    username: str
    password: str = field(repr=False)
    expires_at: float | None = None
    cluster: str = ""
    lease_id: str = ""
    max_expires_at: float | None = None
    issued_at: float = 0.0


class TunnelState(str, enum.Enum):
    STOPPED = "stopped"
    WAITING_CREDENTIALS = "waiting_credentials"
    CONNECTING = "connecting"
    UP = "up"
    RECONNECTING = "reconnecting"
    BACKOFF = "backoff"
    NEEDS_SIGN_IN = "needs_sign_in"
    FAILED = "failed"


class CredentialState(str, enum.Enum):
    """State of a kept credential (AWS session, Vault token, DB lease)."""

    IDLE = "idle"                # not wanted yet
    ACQUIRING = "acquiring"      # logging in / minting
    VALID = "valid"              # held and renewed
    RENEWING = "renewing"
    BACKOFF = "backoff"          # last attempt failed; retry at next_action_at
    NEEDS_SIGN_IN = "needs_sign_in"
    FAILED = "failed"            # needs a config fix or user action
    REVOKED = "revoked"


class Health(str, enum.Enum):
    """Worst-state summary shown by the tray icon."""

    IDLE = "idle"
    OK = "ok"
    PARTIAL = "partial"            # every connected cluster is up, and some are turned off
    DEGRADED = "degraded"
    NEEDS_ACTION = "needs_action"


def _from_dict(cls, data: dict[str, Any]):
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in data.items() if k in names})


@dataclass(frozen=True)
class CredentialStatus:
    kind: str                      # "aws" | "vault" | "db"
    name: str                      # profile, vault address, or cluster name
    state: CredentialState = CredentialState.IDLE
    identity: str = ""             # ARN, token accessor, or DB username (never a secret)
    expires_at: float | None = None
    next_action_at: float | None = None
    since: float | None = None
    last_error: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CredentialStatus":
        obj = _from_dict(cls, data)
        return _replace_enum(obj, "state", CredentialState)


@dataclass(frozen=True)
class LeaseOutcome:
    """What became of one DB user that was to be revoked (``disconnect``, ``stop``)."""

    cluster: str
    username: str
    lease_id: str
    revoked: bool
    how: str = ""                  # revoked: "lease" (sys/leases/revoke) or "token" (with the token that minted it)
    reason: str = ""               # not revoked: why
    hint: str = ""                 # not revoked: the fix (e.g. the Vault policy line to add)
    valid_until: float | None = None   # not revoked: when the DB user ends on its own, if known
    retried: bool = False          # not revoked: kept in the leases file, the next start tries again

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "LeaseOutcome":
        return _from_dict(cls, data)


@dataclass(frozen=True)
class TunnelStatus:
    name: str
    local_port: int
    state: TunnelState = TunnelState.STOPPED
    since: float | None = None
    last_error: str = ""
    hint: str = ""
    next_retry_at: float | None = None
    transport: str = ""
    ssh_client: str = ""           # who speaks SSH on it: "paramiko", "openssh" ("" for ssm-port-forward)
    endpoint: str = ""             # remote host:port
    production: bool = False
    autoconnect: bool = False
    database: str = ""
    connections_open: int = 0
    connections_total: int = 0
    reconnects: int = 0
    username: str = ""             # current DB user (not a secret)
    credential: CredentialStatus | None = None
    role: str = ""                 # what the server said at the last probe: "writer" | "reader" | ""
    expected_role: str = ""        # what this port is for: "writer" | "reader" (Aurora reader_port)
    login: str = ""                # "local": a stable local user/password on the port; "lease": pass-through

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["state"] = self.state.value
        d["credential"] = self.credential.to_dict() if self.credential else None
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TunnelStatus":
        data = dict(data)
        cred = data.pop("credential", None)
        obj = _replace_enum(_from_dict(cls, data), "state", TunnelState)
        if cred:
            obj = _replace(obj, credential=CredentialStatus.from_dict(cred))
        return obj


@dataclass(frozen=True)
class DaemonStatus:
    version: str
    pid: int
    started_at: float
    config_path: str
    log_path: str
    aws: CredentialStatus | None = None
    vault: CredentialStatus | None = None
    tunnels: tuple[TunnelStatus, ...] = field(default_factory=tuple)
    keyring: str = ""              # backend name, or why secrets are memory-only

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "pid": self.pid,
            "started_at": self.started_at,
            "config_path": self.config_path,
            "log_path": self.log_path,
            "aws": self.aws.to_dict() if self.aws else None,
            "vault": self.vault.to_dict() if self.vault else None,
            "tunnels": [t.to_dict() for t in self.tunnels],
            "keyring": self.keyring,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DaemonStatus":
        return cls(
            version=data["version"],
            pid=data["pid"],
            started_at=data["started_at"],
            config_path=data.get("config_path", ""),
            log_path=data.get("log_path", ""),
            aws=CredentialStatus.from_dict(data["aws"]) if data.get("aws") else None,
            vault=CredentialStatus.from_dict(data["vault"]) if data.get("vault") else None,
            tunnels=tuple(TunnelStatus.from_dict(t) for t in data.get("tunnels", [])),
            keyring=data.get("keyring", ""),
        )

    def health(self) -> Health:
        return overall_health(self)


_NEEDS_ACTION = {TunnelState.FAILED, TunnelState.NEEDS_SIGN_IN}
_DEGRADED = {TunnelState.RECONNECTING, TunnelState.BACKOFF, TunnelState.CONNECTING,
             TunnelState.WAITING_CREDENTIALS}


def overall_health(status: DaemonStatus) -> Health:
    """The worst state across credentials and tunnels (what the tray icon shows)."""
    creds = [c for c in (status.aws, status.vault) if c]
    if any(c.state in (CredentialState.NEEDS_SIGN_IN, CredentialState.FAILED) for c in creds):
        return Health.NEEDS_ACTION
    active = [t for t in status.tunnels if t.state != TunnelState.STOPPED]
    if any(t.state in _NEEDS_ACTION for t in active):
        return Health.NEEDS_ACTION
    if any(t.state in _DEGRADED for t in active):
        return Health.DEGRADED
    if any(c.state == CredentialState.BACKOFF for c in creds):
        return Health.DEGRADED
    if not active:
        return Health.IDLE
    return Health.PARTIAL if len(active) < len(status.tunnels) else Health.OK


def _replace(obj, **changes):
    from dataclasses import replace

    return replace(obj, **changes)


def _replace_enum(obj, name: str, enum_cls):
    value = getattr(obj, name)
    return obj if isinstance(value, enum_cls) else _replace(obj, **{name: enum_cls(value)})
