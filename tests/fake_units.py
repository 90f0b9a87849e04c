"""Scripted stand-ins for the credential engine and the tunnels, shaped like supervisor.EngineUnit / TunnelUnit.

Used by the supervisor and daemon tests to check orchestration (what is started, stopped and revoked,
in which order) without servers; the real units are exercised against the sandbox stack elsewhere.
A tunnel whose cluster name starts with "busy" fails like a port held by another process.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from dbtunneld.core.config import ClusterConfig, Config
from dbtunneld.core.model import CredentialState, CredentialStatus, LeaseOutcome, TunnelState, TunnelStatus
from dbtunneld.core.model import DbCredentials
from dbtunneld.core.paths import Paths
from dbtunneld.engine.units import EngineFactory, EngineUnit, TunnelFactory, TunnelUnit, UnitSpec

_serial = itertools.count(1)


class _Log(list[tuple[str, ...]]):
    """(event, name) across all fakes of the process, in order; also appended to $FAKE_UNITS_LOG."""

    def append(self, item: tuple[str, ...]) -> None:
        super().append(item)
        path = os.environ.get("FAKE_UNITS_LOG")
        if path:
            with open(path, "a") as f:
                f.write(" ".join(item) + "\n")


LOG = _Log()


class FakeEngine:
    def __init__(self, config: Config, paths: Paths, on_event: Callable[[str, Any], None]) -> None:
        self.config, self.paths, self.on_event = config, paths, on_event
        self.creds: dict[str, DbCredentials] = {}
        self.revoked: list[str] = []
        self.started = self.stopped = False
        self.renewed: list[str | None] = []
        self.signed_in = True
        self.vault_expires_at = time.time() + 600
        self.lock = threading.Lock()

    def start(self) -> None:
        self.started = True
        LOG.append(("engine-start", self.config.vault.address))

    def stop(self, timeout: float) -> list[dict[str, Any]]:
        with self.lock:
            names = list(self.creds)
        outcomes = [o for name in names for o in self.release(name)]
        self.stopped = True
        LOG.append(("engine-stop", self.config.vault.address))
        return outcomes

    def want(self, cluster: ClusterConfig) -> None:
        with self.lock:
            if cluster.name not in self.creds:
                n = next(_serial)
                self.creds[cluster.name] = DbCredentials(f"v-{cluster.name}-{n}", f"secret-pw-{n}-xyz", time.time() + 3600)
        LOG.append(("want", cluster.name))
        self.on_event("credentials", {"name": cluster.name})

    def release(self, name: str) -> list[dict[str, Any]]:
        with self.lock:
            creds = self.creds.pop(name, None)
            if creds is None:
                return []
            self.revoked.append(name)
            LOG.append(("revoke", name))
        return [LeaseOutcome(name, creds.username, f"database/creds/{name}/1", revoked=True, how="lease").to_dict()]

    def renew_now(self, name: str, rotate: bool = False) -> None:
        self.renewed.append(name)

    def current(self, name: str) -> DbCredentials | None:
        with self.lock:
            return self.creds.get(name)

    def credential_status(self) -> tuple[CredentialStatus, CredentialStatus, dict[str, CredentialStatus]]:
        aws = CredentialStatus("aws", "dev", CredentialState.VALID if self.signed_in else CredentialState.NEEDS_SIGN_IN,
                               identity="arn:aws:sts::123:assumed-role/dev/me")
        vault = CredentialStatus("vault", self.config.vault.address, CredentialState.VALID, expires_at=self.vault_expires_at)
        with self.lock:
            dbs = {n: CredentialStatus("db", n, CredentialState.VALID, identity=c.username, expires_at=c.expires_at)
                   for n, c in self.creds.items()}
        return aws, vault, dbs

    def sso_login(self, wait: float, use_device_code: bool = False) -> dict[str, Any]:
        return {"signed_in": True, "identity": "arn:aws:sts::123:assumed-role/dev/me"}

    def keyring_note(self) -> str:
        return "memory only (fake)"

    def update_config(self, config: Config) -> None:
        self.config = config

    def session_factory(self) -> Any:
        return None


class FakeTunnel:
    def __init__(self, spec: UnitSpec, port: int, engine: EngineUnit, poke: Callable[[], None]) -> None:
        self.spec, self.engine, self.poke = spec, engine, poke
        self.port = port
        self._status = TunnelStatus(spec.cluster.name, self.port, transport=spec.cluster.effective_transport(spec.bastion),
                                    endpoint=f"{spec.cluster.endpoint}:{spec.cluster.port}")
        self.checks = 0

    def start(self) -> None:
        if self.spec.cluster.name.startswith("busy"):
            self._set(TunnelState.FAILED, last_error=f"127.0.0.1:{self.port} is already in use by pid 1 (init)",
                      hint="stop that process or pin another local_port")
        else:
            self._set(TunnelState.UP)
        LOG.append(("tunnel-start", self.spec.cluster.name))

    def stop(self, timeout: float = 5.0) -> None:
        if self._status.state != TunnelState.STOPPED:
            LOG.append(("tunnel-stop", self.spec.cluster.name))
        self._set(TunnelState.STOPPED)

    def status(self) -> TunnelStatus:
        return self._status

    def check_now(self) -> None:
        self.checks += 1

    def reconnect(self) -> None:
        self._status = replace(self._status, reconnects=self._status.reconnects + 1)

    def _set(self, state: TunnelState, **kw: Any) -> None:
        self._status = replace(self._status, state=state, since=time.time(), **kw)
        self.poke()


def engine_factory(config: Config, paths: Paths, on_event: Callable[[str, Any], None]) -> FakeEngine:
    return FakeEngine(config, paths, on_event)


def tunnel_factory(spec: UnitSpec, port: int, engine: EngineUnit, poke: Callable[[], None]) -> FakeTunnel:
    return FakeTunnel(spec, port, engine, poke)


# The fakes fit the supervisor's seams (mypy checks these two lines).
_ENGINE_SEAM: EngineFactory = engine_factory
_TUNNEL_SEAM: TunnelFactory = tunnel_factory
_UNITS: tuple[type[EngineUnit], type[TunnelUnit]] = (FakeEngine, FakeTunnel)

CONFIG = """
[vault]
address = "{vault}"
role = "dev"

[bastion]
transport = "ssh"
host = "127.0.0.1"
port = 2222
user = "tunnel"

{clusters}
"""

CLUSTER = """
[[clusters]]
name = "{name}"
endpoint = "{name}.db.internal"
db_role = "{name}-ro"
local_port = {port}
autoconnect = {auto}
"""


def config_text(clusters: list[tuple[str, int, bool]], vault: str = "http://127.0.0.1:8200") -> str:
    body = "".join(CLUSTER.format(name=n, port=p, auto=str(a).lower()) for n, p, a in clusters)
    return CONFIG.format(vault=vault, clusters=body)
