"""What the supervisor is built from: the seams it drives (``EngineUnit``, ``TunnelUnit`` and
their factories), the spec a cluster's unit is built from (``UnitSpec``), and the stand-in for a
tunnel that could not be built (``UnavailableTunnel``)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Protocol

from ..core.config import AwsConfig, BastionConfig, ClusterConfig, Config, CredentialSettings, TunnelSettings, VaultConfig
from ..core.errors import DbtunneldError
from ..core.model import CredentialStatus, DbCredentials, TunnelState, TunnelStatus
from ..core.paths import Paths

class EngineUnit(Protocol):
    """The credential engine as the supervisor uses it (see ``credentials.CredentialEngine``)."""

    def start(self) -> None: ...
    def stop(self, timeout: float) -> list[dict[str, Any]] | None: ...   # revokes every lease (an outcome per lease)
    def want(self, cluster: ClusterConfig) -> None: ...     # mint and keep a lease (async)
    def release(self, name: str) -> list[dict[str, Any]] | None: ...    # revoke the lease (an outcome per lease)
    def renew_now(self, name: str, rotate: bool = False) -> None: ...
    def current(self, name: str) -> DbCredentials | None: ...
    def credential_status(self) -> tuple[CredentialStatus | None, CredentialStatus | None, dict[str, CredentialStatus]]: ...
    def sso_login(self, wait: float, use_device_code: bool = False) -> dict[str, Any]: ...
    def keyring_note(self) -> str: ...
    def update_config(self, config: Config) -> None: ...   # same engine spec, other clusters
    def session_factory(self) -> Any: ...                  # boto3 session for the transports


class TunnelUnit(Protocol):
    """One cluster's tunnel (see ``tunnel.Tunnel``)."""

    def start(self) -> None: ...
    def stop(self, timeout: float = ...) -> None: ...
    def status(self) -> TunnelStatus: ...
    def check_now(self) -> None: ...                       # check the upstream now (new credentials...)
    def reconnect(self) -> None: ...                       # rebuild the upstream now, or retry a failed one


EngineFactory = Callable[[Config, Paths, Callable[[str, Any], None]], EngineUnit]
# (spec, local port, engine, on_change) -> tunnel
TunnelFactory = Callable[["UnitSpec", int, EngineUnit, Callable[[], None]], TunnelUnit]


@dataclass(frozen=True)
class UnitSpec:
    """Everything a cluster's tunnel is built from: equal specs keep running across a reload."""

    cluster: ClusterConfig
    bastion: BastionConfig
    aws: AwsConfig
    tunnels: TunnelSettings


def engine_spec(config: Config) -> tuple[AwsConfig, VaultConfig, CredentialSettings]:
    """What the credential engine is built from: any change restarts every unit."""
    return (config.aws, config.vault, config.credentials)


def unit_specs(config: Config) -> dict[str, UnitSpec]:
    """One unit per cluster, plus one per Aurora reader_port (named "<cluster>-reader")."""
    from .aurora import reader_unit

    clusters = [u for c in config.clusters for u in ([c, reader_unit(c)] if c.reader_port else [c])]
    return {c.name: UnitSpec(c, config.bastion, config.aws, config.tunnels) for c in clusters}



class UnavailableTunnel:
    """Stands in for a tunnel that could not be built (no free port in the range, ...): failed state."""

    def __init__(self, name: str, port: int, error: DbtunneldError) -> None:
        self._status = TunnelStatus(name, port, TunnelState.FAILED, since=time.time(),
                                    last_error=error.message, hint=error.hint)

    def start(self) -> None:
        pass

    def stop(self, timeout: float = 0.0) -> None:
        pass

    def status(self) -> TunnelStatus:
        return self._status

    def check_now(self) -> None:
        pass

    def reconnect(self) -> None:
        pass
