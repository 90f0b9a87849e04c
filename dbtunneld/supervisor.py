"""The supervisor: builds the engine's units from a config and keeps them matching it.

It owns one credential engine (AWS session, Vault token, a DB lease per connected cluster)
and one tunnel unit per cluster. ``connect`` = want the cluster's credentials + start its
tunnel; ``disconnect`` = stop the tunnel + revoke the lease. What the user connected is kept
in ``wanted.json`` (``wanted.WantedSet``) and connected again at the next start (after a crash,
a quit or a reboot). ``reload`` is a reconcile: units whose spec is unchanged keep running,
removed or changed ones stop first (freeing their ports), then new ones start; the slow part
runs outside the lock, so status answers meanwhile. A status snapshot (``model.DaemonStatus``) is published as an
event whenever it changes. The engine and tunnels are built by factories (``engine_factory`` and
``tunnel_factory`` below build the real ones: ``lease.CredentialEngine``, ``tunnel.Tunnel``), so
tests of the orchestration use fakes.

A tunnel waits for its cluster's DB credentials before it connects (its prerequisite); when the
engine announces new credentials or a sign-in, the waiting tunnels are checked at once. After a
sleep (a jump between the wall and monotonic clocks, ``wake.WakeDetector``) every connected
tunnel and the credential engine are checked at once. A real tunnel's health probe logs in with
the cluster's current DB user (``login_probe``), so probes never count as aborted connects.
"""

from __future__ import annotations

import logging
import os
import shlex
import struct
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterable, Protocol
from urllib.parse import quote

from . import __version__, model
from .config import AwsConfig, BastionConfig, ClusterConfig, Config, CredentialSettings, TunnelSettings, VaultConfig
from .errors import DbtunneldError, NeedsUserError, SignInNeededError, TransientError, UnknownNameError
from .model import CredentialState, CredentialStatus, DaemonStatus, DbCredentials, TunnelState, TunnelStatus
from .paths import Paths
from .sso import refresh_sso_token
from .wake import WakeDetector
from .wanted import WantedSet

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
STATUS_POLL = 5.0                 # fallback re-read of the status; units poke the publisher on every change
CREDS_WAIT = 20.0                 # creds() waits this long for a lease being minted
SETTLED = {TunnelState.UP, TunnelState.FAILED, TunnelState.NEEDS_SIGN_IN, TunnelState.STOPPED}


# ----------------------------------------------------------------------------- what the supervisor needs

class EngineUnit(Protocol):
    """The credential engine as the supervisor uses it (see ``lease.CredentialEngine``)."""

    def start(self) -> None: ...
    def stop(self, timeout: float) -> list[dict] | None: ...   # revokes every lease (an outcome per lease)
    def want(self, cluster: ClusterConfig) -> None: ...     # mint and keep a lease (async)
    def release(self, name: str) -> list[dict] | None: ...    # revoke the lease (an outcome per lease)
    def renew_now(self, name: str) -> None: ...
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


# ----------------------------------------------------------------------------- connection strings

def connection_strings(port: int, username: str, database: str = "", host: str = LOCALHOST) -> dict[str, str]:
    """How a client tool connects; never contains the password."""
    db = f"/{quote(database)}" if database else "/"
    mysql = ["mysql", "-h", host, "-P", str(port), "-u", username, "-p"] + ([database] if database else [])
    return {
        "mysql": " ".join(shlex.quote(a) for a in mysql),
        "url": f"mysql://{quote(username, safe='')}@{host}:{port}{db}",
        "jdbc": f"jdbc:mysql://{host}:{port}{db}?user={quote(username, safe='')}",
    }


# ----------------------------------------------------------------------------- one cluster

@dataclass
class ReloadPlan:
    """What a reload stops (detached from the tables first) and what it starts after."""

    stop: list["ClusterSlot"]
    release: list[str]
    start: list[str]
    connect: set[str]
    summary: dict[str, list[str]]
    old_engine: Any = None


class ClusterSlot:
    """A cluster's running unit and whether the user wants it connected."""

    def __init__(self, spec: UnitSpec, tunnel: TunnelUnit) -> None:
        self.spec = spec
        self.tunnel = tunnel
        self.wanted = False

    @property
    def name(self) -> str:
        return self.spec.cluster.name

    @property
    def cred_name(self) -> str:
        """Whose DB user this tunnel uses: an Aurora reader port shares its cluster's."""
        return self.spec.cluster.reader_of or self.spec.cluster.name

    def status(self, cred: CredentialStatus | None) -> TunnelStatus:
        st = self.tunnel.status()
        username = cred.identity if cred and cred.state not in (CredentialState.IDLE, CredentialState.REVOKED) else ""
        return replace(st, production=self.spec.cluster.production, autoconnect=self.spec.cluster.autoconnect,
                       database=self.spec.cluster.database, credential=cred, username=st.username or username,
                       login=self.spec.cluster.login)


# ----------------------------------------------------------------------------- the supervisor

class Supervisor:
    """Owns the engine and the tunnels; every public method is safe from any thread."""

    def __init__(self, config: Config, paths: Paths, *, engine_factory: EngineFactory,
                 tunnel_factory: TunnelFactory, on_event: Callable[[str, Any], None] | None = None,
                 config_path: str = "", clock: Callable[[], float] = time.time,
                 wake: WakeDetector | None = None) -> None:
        self.config = config
        self.paths = paths
        self.config_path = config_path or config.source
        self._engine_factory = engine_factory
        self._tunnel_factory = tunnel_factory
        self._emit = on_event or (lambda event, data: None)
        self._clock = clock
        self.started_at = clock()
        self._lock = threading.RLock()
        self._slots: dict[str, ClusterSlot] = {}
        self._engine: EngineUnit | None = None
        self._publisher = StatusPublisher(self.status_dict, self._emit)
        self._wake = wake or WakeDetector()      # checks connected tunnels and the engine after a sleep
        self._wanted = WantedSet(paths.wanted_file)   # what the user connected, across restarts
        self.stopping = False
        self._reloading = False                  # the engine is being replaced (see ``reload``)
        self._reload_serial = threading.Lock()

    # ---- lifecycle

    def start(self, autoconnect: bool = True) -> None:
        """Start the engine (it revokes orphans of a crashed run), build the units, and connect the
        ``autoconnect`` clusters and those the user had connected before the last stop or crash."""
        with self._lock:
            self._engine = self._start_engine(self.config)
            for spec in unit_specs(self.config).values():
                self._slots[spec.cluster.name] = self._new_slot(spec, self.config)
            self._wanted.keep_only(self._slots)
            restored = self._wanted.names() if autoconnect else set()
            auto = [s for s in self._slots.values()
                    if s.spec.cluster.autoconnect or s.name in restored] if autoconnect else []
            for slot in auto:
                self._connect_slot(slot)
        self._publisher.start()
        self._wake.start()
        log.info("supervisor started: %d clusters, %d connected at start (%s)", len(self._slots), len(auto),
                 ", ".join(f"{s.name}: {'autoconnect' if s.spec.cluster.autoconnect else 'connected before'}"
                           for s in auto) or "none")

    def stop(self, timeout: float = 15.0) -> list[dict]:
        """Stop every tunnel, then revoke every lease and the token (bounded by ``timeout``);
        returns what became of each DB user (``model.LeaseOutcome`` dicts)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self.stopping = True
            slots, self._slots = list(self._slots.values()), {}
            engine, self._engine = self._engine, None
        self._wake.stop()
        self._stop_tunnels(slots, deadline)
        outcomes: list[dict] = []
        if engine is not None:
            self._wake.unregister(engine)
            outcomes = engine.stop(max(1.0, deadline - time.monotonic())) or []
        self._publisher.stop()
        log.info("supervisor stopped")
        return outcomes

    def _start_engine(self, config: Config) -> EngineUnit:
        """Build and start the engine; one that can re-check its expiries is checked after a sleep."""
        engine = self._engine_factory(config, self.paths, self._engine_event)
        engine.start()
        if callable(getattr(engine, "check_now", None)):
            self._wake.register(engine)
        return engine

    def _new_slot(self, spec: UnitSpec, config: Config) -> ClusterSlot:
        """Build a cluster's tunnel on its stable port; a port problem is the unit's failed state."""
        try:
            port = self._port_for(spec, config)
            tunnel = self._tunnel_factory(spec, port, self._engine, self._publisher.poke)
        except DbtunneldError as exc:
            log.warning("[cluster=%s] cannot build the tunnel: %s", spec.cluster.name, exc.message)
            tunnel = UnavailableTunnel(spec.cluster.name, spec.cluster.local_port or 0, exc)
        return ClusterSlot(spec, tunnel)

    def _port_for(self, spec: UnitSpec, config: Config) -> int:
        from .ports import PortBook

        pinned = [c.local_port for c in config.clusters if c.local_port and c.name != spec.cluster.name]
        book = PortBook(self.paths.ports_file, spec.tunnels.port_range)
        return book.port_for(spec.cluster.name, spec.cluster.local_port, reserved=pinned)

    def _stop_tunnels(self, slots: Iterable[ClusterSlot], deadline: float) -> None:
        slots = list(slots)
        for slot in slots:
            self._wake.unregister(slot.tunnel)
        threads = [threading.Thread(target=self._stop_slot, args=(s, deadline), name=f"stop-{s.name}")
                   for s in slots]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.1, deadline - time.monotonic()))

    def _stop_slot(self, slot: ClusterSlot, deadline: float) -> None:
        try:
            slot.tunnel.stop(max(0.5, deadline - time.monotonic()))
        except Exception:
            log.exception("[cluster=%s] tunnel stop failed", slot.name)

    def _engine_event(self, event: str, data: Any = None) -> None:
        """Engine events go out as they are; new credentials or a sign-in wake the waiting tunnels."""
        self._emit(event, data)
        kind = data.get("kind", "") if isinstance(data, dict) else ""
        if kind in ("db.minted", "db.rotated", "sso.signed_in", "vault.login"):
            name = data.get("name") if kind.startswith("db.") else None
            for slot in list(self._slots.values()):
                if slot.wanted and name in (None, slot.name):
                    slot.tunnel.check_now()
        self._publisher.poke()

    # ---- commands

    def _slot(self, name: str) -> ClusterSlot:
        self._require_engine()
        slot = self._slots.get(name)
        if slot is None:
            known = ", ".join(sorted(self._slots)) or "none"
            raise UnknownNameError(f'no cluster named "{name}" (known: {known})')
        return slot

    def _require_engine(self) -> EngineUnit:
        if self._reloading and not self.stopping:
            raise NeedsUserError("the daemon is restarting its credentials after a config change",
                                 "run the command again in a few seconds")
        if self._engine is None or self.stopping:
            raise NeedsUserError("the daemon is stopping", "run the command again once it has restarted")
        return self._engine

    def _connect_slot(self, slot: ClusterSlot) -> None:
        slot.wanted = True
        self._wanted.add([slot.name])
        cluster = slot.spec.cluster
        self._require_engine().want(replace(cluster, name=slot.cred_name) if cluster.reader_of else cluster)
        slot.tunnel.start()
        self._wake.register(slot.tunnel)
        log.info("[cluster=%s] connect requested (127.0.0.1:%s)", slot.name, slot.spec.cluster.local_port or "auto")

    def connect(self, names: Iterable[str] | None = None, wait: float = 0.0) -> list[dict[str, Any]]:
        """Connect the named clusters (all when ``names`` is None); wait up to ``wait`` s for them to settle."""
        with self._lock:
            slots = [self._slot(n) for n in names] if names is not None else list(self._slots.values())
            for slot in slots:
                self._connect_slot(slot)
        self._publisher.poke()
        return self._settle([s.name for s in slots], wait)

    def disconnect(self, names: Iterable[str] | None = None) -> list[str]:
        """Stop the tunnels and revoke the leases of the named clusters (all when None)."""
        return self.disconnect_report(names)["disconnected"]

    def disconnect_report(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """``disconnect``, answered with what became of each DB user:
        ``{"disconnected": [names], "revocation": [model.LeaseOutcome dicts]}``."""
        with self._lock:
            slots = [self._slot(n) for n in names] if names is not None else [s for s in self._slots.values() if s.wanted]
            engine = self._require_engine()
            for slot in slots:
                slot.wanted = False
            self._wanted.discard(s.name for s in slots)
        # Outside the lock: stopping and revoking take up to the revoke bound; status readers go on.
        self._stop_tunnels(slots, time.monotonic() + self.config.credentials.revoke_timeout)
        outcomes: list[dict] = []
        for slot in slots:
            if not self._cred_still_used(slot):
                outcomes += engine.release(slot.cred_name) or []
            log.info("[cluster=%s] disconnected", slot.name)
        self._publisher.poke()
        return {"disconnected": [s.name for s in slots], "revocation": outcomes}

    def _cred_still_used(self, slot: ClusterSlot) -> bool:
        """Another connected tunnel (a cluster and its reader port) shares the slot's DB user."""
        with self._lock:
            return any(s.wanted and s is not slot and s.cred_name == slot.cred_name for s in self._slots.values())

    def reconnect(self, names: Iterable[str] | None = None) -> list[str]:
        """Rebuild the upstream of connected tunnels now (the listener stays bound)."""
        with self._lock:
            slots = [self._slot(n) for n in names] if names is not None else [s for s in self._slots.values() if s.wanted]
            for slot in slots:
                if not slot.wanted:
                    raise NeedsUserError(f'cluster "{slot.name}" is not connected', f"run `dbtunneld connect {slot.name}`")
                slot.tunnel.reconnect()
        self._publisher.poke()
        return [s.name for s in slots]

    def renew(self, name: str | None = None, rotate: bool = False) -> list[str]:
        """Renew the leases of one cluster, or of every connected one, now (``rotate``: mint new
        DB users; with login = "local" saved logins keep working)."""
        slots = [self._slot(name)] if name is not None else [s for s in self._slots.values() if s.wanted]
        for slot in slots:
            if not slot.wanted:
                raise NeedsUserError(f'cluster "{slot.name}" is not connected', f"run `dbtunneld connect {slot.name}`")
            engine = self._require_engine()
            engine.renew_now(slot.cred_name, rotate=True) if rotate else engine.renew_now(slot.cred_name)
        self._publisher.poke()
        return [s.name for s in slots]

    def login(self, wait: float = 0.0, use_device_code: bool = False) -> dict[str, Any]:
        return self._require_engine().sso_login(wait, use_device_code)

    def creds(self, name: str, field: str = "username", wait: float = CREDS_WAIT) -> dict[str, Any]:
        """Username, connection strings and expiry; the password only when ``field == "password"``."""
        slot = self._slot(name)
        if not slot.wanted:
            raise NeedsUserError(f'cluster "{name}" is not connected', f"run `dbtunneld connect {name}` first")
        cred = self._wait_for_credentials(slot.cred_name, wait)
        port = self._port_of(slot)
        c = slot.spec.cluster
        passwords = self._local_passwords(c)
        username = local_user(c) if passwords else cred.username
        out: dict[str, Any] = {"name": name, "username": username, "host": LOCALHOST, "port": port,
                               "database": c.database, "expires_at": None if passwords else cred.expires_at,
                               "production": c.production, "login": "local" if passwords else "lease",
                               "lease_user": cred.username, "lease_expires_at": cred.expires_at}
        out.update(connection_strings(port, username, c.database))
        if field == "password":
            out["password"] = passwords.get(slot.cred_name) if passwords else cred.password
        return out

    def _local_passwords(self, c: ClusterConfig) -> Any:
        """The engine's local password store when the cluster uses ``login = "local"``."""
        return getattr(self._engine, "local_passwords", None) if c.login == "local" else None

    def reset_local_password(self, name: str) -> dict[str, Any]:
        """A new local password for the cluster (saved logins need it); open sessions go on."""
        slot = self._slot(name)
        passwords = self._local_passwords(slot.spec.cluster)
        if passwords is None:
            raise NeedsUserError(f'cluster "{name}" logs in with the leased user (login = "lease")',
                                 'set login = "local" for it in config.toml to get a stable local password')
        passwords.reset(slot.cred_name)
        return {"name": name, "username": local_user(slot.spec.cluster)}

    def _port_of(self, slot: ClusterSlot) -> int:
        return slot.tunnel.status().local_port or slot.spec.cluster.local_port or 0

    def _wait_for_credentials(self, name: str, wait: float) -> DbCredentials:
        deadline = time.monotonic() + wait
        while True:
            cred = self._require_engine().current(name)
            if cred is not None:
                return cred
            problem = self._credential_problem(name)
            if problem is not None or time.monotonic() >= deadline:
                raise problem or NeedsUserError(f'no credentials for "{name}" yet',
                                                "see `dbtunneld status` for what the daemon is waiting for")
            time.sleep(0.05)

    def _credential_problem(self, name: str) -> Exception | None:
        return credential_problem(self._require_engine().credential_status(), name)

    def _settle(self, names: list[str], wait: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + wait
        while True:
            snap = {t.name: t for t in self.status().tunnels if t.name in names}
            settled = all(t.state in SETTLED and (t.state != TunnelState.UP or t.username) for t in snap.values())
            if settled or time.monotonic() >= deadline:
                return [snap[n].to_dict() for n in names if n in snap]
            time.sleep(0.05)

    # ---- reload

    def reload(self, new: Config) -> dict[str, list[str]]:
        """Reconcile the running units with ``new`` (already validated by the caller).

        The lock is held only to change the tables: stopping tunnels, revoking leases and
        stopping an engine (each up to ``revoke_timeout``, longer when Vault hangs) run outside
        it, so ``status`` answers at once during a reload. Reloads run one at a time."""
        with self._reload_serial:
            with self._lock:
                plan = self._plan_reload(new)
            self._retire(plan)
            with self._lock:
                self._start_planned(plan, new)
                self.config = new
        self._publisher.poke()
        summary = plan.summary
        log.info("reloaded config: %s", ", ".join(f"{k} {v}" for k, v in summary.items() if v) or "no change")
        return summary

    def _plan_reload(self, new: Config) -> "ReloadPlan":
        """Under the lock: detach the units that must stop and note what starts after."""
        restart = engine_spec(new) != engine_spec(self.config)
        desired, running = unit_specs(new), dict(self._slots)
        kept = [] if restart else [n for n in running if n in desired and desired[n] == running[n].spec]
        gone = [n for n in running if n not in kept]
        wanted = {n for n, slot in running.items() if slot.wanted}
        release = [] if restart else [n for n in gone if n in wanted and not running[n].spec.cluster.reader_of]
        plan = ReloadPlan(stop=[running[n] for n in gone], release=release,
                          start=[n for n in desired if n not in kept],
                          connect={n for n in desired if n not in kept and (
                              n in wanted or (n not in running and desired[n].cluster.autoconnect))},
                          summary={"kept": kept, "stopped": [n for n in gone if n not in desired],
                                   "restarted": [n for n in gone if n in desired],
                                   "started": [n for n in desired if n not in running]})
        for n in gone:
            del self._slots[n]
        if restart:
            log.info("AWS / Vault / credential settings changed: restarting every unit")
            plan.old_engine, self._engine = self._engine, None
            self._reloading = True
        else:
            self._engine.update_config(new)
        self._wanted.keep_only(desired)
        return plan

    def _retire(self, plan: "ReloadPlan") -> None:
        """Outside the lock: stop the detached tunnels, revoke their leases or stop the old engine."""
        bound = self.config.credentials.revoke_timeout
        self._stop_tunnels(plan.stop, time.monotonic() + bound)
        engine = self._engine
        for n in plan.release:
            if engine is not None:
                engine.release(n)
        if plan.old_engine is not None:
            self._wake.unregister(plan.old_engine)
            plan.old_engine.stop(bound)

    def _start_planned(self, plan: "ReloadPlan", new: Config) -> None:
        """Under the lock: a new engine if the old one was stopped, then the new units."""
        if self.stopping:
            return
        if self._engine is None:
            self._engine = self._start_engine(new)
            self._reloading = False
        for n in plan.start:
            spec = unit_specs(new)[n]
            self._slots[n] = slot = self._new_slot(spec, new)
            if n in plan.connect:
                self._connect_slot(slot)

    # ---- status

    def status(self) -> DaemonStatus:
        with self._lock:
            slots, engine = list(self._slots.values()), self._engine
        aws, vault, dbs = engine.credential_status() if engine else (None, None, {})
        tunnels = tuple(s.status(dbs.get(s.cred_name)) for s in slots)
        return DaemonStatus(version=__version__, pid=os.getpid(), started_at=self.started_at,
                            config_path=str(self.config_path), log_path=str(self.paths.log_file),
                            aws=aws, vault=vault, tunnels=tunnels,
                            keyring=engine.keyring_note() if engine else "")

    def status_dict(self) -> dict[str, Any]:
        """The snapshot as sent on the wire, with the overall health the tray icon shows."""
        st = self.status()
        return {**st.to_dict(), "health": model.overall_health(st).value}


# ----------------------------------------------------------------------------- real units

def credential_problem(statuses: tuple, name: str) -> Exception | None:
    """What blocks a cluster's credentials and needs the user (sign in, fix something); None otherwise."""
    aws, vault, dbs = statuses
    for st in (aws, vault, dbs.get(name)):
        if st is None:
            continue
        error = _without_hint(st.last_error)
        if st.state == CredentialState.NEEDS_SIGN_IN:
            return SignInNeededError(error or f"{st.kind} {st.name}: sign-in needed")
        if st.state == CredentialState.FAILED:
            return NeedsUserError(f"{st.kind} {st.name}: {error or 'failed'}",
                                  "run `dbtunneld doctor` to find the broken layer")
    return None


def _without_hint(text: str) -> str:
    """An error line without its trailing "(hint: ...)" (the error we raise carries its own hint)."""
    head, sep, _ = (text or "").partition(" (hint: ")
    return head if sep else (text or "")


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


class EngineAdapter:
    """``lease.CredentialEngine`` seen as the supervisor's ``EngineUnit``."""

    def __init__(self, config: Config, paths: Paths, on_event: Callable[[str, Any], None]) -> None:
        from .keystore import Keystore
        from .lease import CredentialEngine

        from .local_login import LocalPasswords

        self.keystore = Keystore.open()
        self.local_passwords = LocalPasswords(self.keystore)   # login = "local": one per cluster
        self.paths = paths
        self._on_event = on_event
        self.engine = CredentialEngine(config, paths, self.keystore, on_event=self._forward)

    def _forward(self, ev: Any) -> None:
        """Engine events go out as ``credentials`` events (never with secrets: the engine's rule)."""
        self._on_event("credentials", {"kind": ev.kind, "name": ev.name, "at": ev.at, "detail": ev.detail,
                                       "status": ev.status.to_dict() if ev.status else None})

    def start(self) -> None:
        self.engine.start()

    def stop(self, timeout: float) -> list[dict]:
        return [o.to_dict() for o in self.engine.stop(revoke=True, timeout=timeout)]

    def want(self, cluster: ClusterConfig) -> None:
        self.engine.request(cluster.name)

    def release(self, name: str) -> list[dict]:
        return [o.to_dict() for o in self.engine.release(name)]   # the engine logs each lease's outcome

    def renew_now(self, name: str, rotate: bool = False) -> None:
        self.engine.renew_now(name, rotate=rotate)

    def check_now(self) -> None:
        """Re-run every keeper's schedule now: after a sleep, wall-clock deadlines may have passed."""
        self.engine.tokens.wake()
        for keeper in list(self.engine.keepers.values()):
            keeper.wake()

    def current(self, name: str) -> Any:
        return self.engine.current(name)

    def credential_status(self) -> tuple:
        return self.engine.status()

    def keyring_note(self) -> str:
        return self.keystore.describe()

    def update_config(self, config: Config) -> None:
        self.engine.config = config          # the engine reads clusters from it when one is wanted

    def session_factory(self) -> Any:
        return self.engine.aws.boto3()

    def sso_login(self, wait: float, use_device_code: bool = False) -> dict[str, Any]:
        """Start the sign-in unless signed in (authorization code with PKCE, or the device flow);
        with ``wait`` > 0, wait for the confirmation. The client opens the browser."""
        if self._signed_in():
            return self._signed_in_result()
        info = self.engine.sso_login(open_browser=None, use_device_code=use_device_code)
        deadline = time.monotonic() + wait
        while wait > 0 and time.monotonic() < deadline:
            if self._signed_in():
                return self._signed_in_result()
            time.sleep(0.2)
        return {**info, "signed_in": False}

    def _signed_in(self) -> bool:
        """Signed in = the SSO token works or refreshes (an expired access token alone is not
        a reason to sign in again); other profiles: as the engine found them."""
        try:
            if self.engine.aws.sso_settings() is not None:
                return refresh_sso_token(self.engine.aws) > time.time()
        except SignInNeededError:
            return False
        except DbtunneldError:
            pass
        return self.engine.aws_status().state == CredentialState.VALID

    def _signed_in_result(self) -> dict[str, Any]:
        st = self.engine.aws_status()
        return {"signed_in": True, "identity": st.identity, "expires_at": st.expires_at}


def engine_factory(config: Config, paths: Paths, on_event: Callable[[str, Any], None]) -> EngineUnit:
    return EngineAdapter(config, paths, on_event)


def _transport_config(spec: UnitSpec) -> Config:
    """The parts of a config a transport is built from (bastion, AWS) for one unit."""
    return Config(vault=VaultConfig(address="", role=""), clusters=(spec.cluster,), aws=spec.aws,
                  bastion=spec.bastion, tunnels=spec.tunnels)


def tunnel_factory(spec: UnitSpec, port: int, engine: EngineUnit, on_change: Callable[[], None]) -> TunnelUnit:
    """A real ``tunnel.Tunnel`` that waits for the cluster's credentials before connecting."""
    from .transport import build_transport
    from .tunnel import Tunnel

    c = spec.cluster
    cred_name = c.reader_of or c.name
    transport = build_transport(_transport_config(spec), c, session_factory=engine.session_factory)

    def credentials_ready() -> bool:
        if engine.current(cred_name) is not None:
            return True
        problem = credential_problem(engine.credential_status(), cred_name)
        if problem is not None:
            raise problem
        return False

    from .aurora import RoleCheckedTunnel, expected_role

    checked: list[RoleCheckedTunnel] = []
    tunnel = Tunnel(c.name, port, c.endpoint, c.port, transport, spec.tunnels,
                    prerequisite=credentials_ready, on_change=lambda status: on_change(),
                    probe=login_probe(lambda: engine.current(cred_name), lambda ro: checked[0].observe(ro)),
                    before_relay=local_login_for(c, engine))
    checked.append(RoleCheckedTunnel(tunnel, expected_role(c)))
    return checked[0]


def local_user(c: ClusterConfig) -> str:
    """The stable local user of a ``login = "local"`` cluster (its reader port shares it)."""
    return c.local_user or c.reader_of or c.name


def local_login_for(c: ClusterConfig, engine: EngineUnit) -> Any:
    """The tunnel's ``before_relay`` step for ``login = "local"`` (None: pass-through)."""
    passwords = getattr(engine, "local_passwords", None)
    if c.login != "local" or passwords is None:
        return None
    from .local_login import LocalLogin

    cred_name = c.reader_of or c.name
    tls = None
    if c.local_tls:
        from .local_tls import server_context
        tls = server_context(getattr(engine, "paths").state_dir)
    return LocalLogin(c.name, local_user(c), lambda: passwords.get(cred_name), lambda: engine.current(cred_name),
                      tls=tls)


# ----------------------------------------------------------------------------- the login probe

def login_probe(credentials: Callable[[], DbCredentials | None],
                on_read_only: Callable[[bool], None] | None = None) -> Callable[..., Any]:
    """A tunnel probe that logs in with the cluster's current DB user, then quits.

    The greeting-only probe (``tunnel.probe_mysql``) aborts the handshake, which MySQL counts
    against max_connect_errors for the bastion's address; a completed login resets that count.
    Until the cluster has credentials, the greeting-only probe. ``on_read_only`` gets the
    server's read-only flag after each login (``aurora.read_only_flags``).
    """
    from .tunnel import probe_mysql

    def probe(transport: Any, host: str, port: int, timeout: float) -> Any:
        cred = credentials()
        if cred is None:
            return probe_mysql(transport, host, port, timeout)
        return probe_mysql_login(transport, host, port, timeout, cred, on_read_only)
    return probe


def probe_mysql_login(transport: Any, host: str, port: int, timeout: float, cred: DbCredentials,
                      on_read_only: Callable[[bool], None] | None = None) -> Any:
    """Log in over a channel of ``transport`` and quit. A server error (1045 access denied, 1129
    host blocked, ...) is a refusal (``ok=False``); no answer or not MySQL raises TransientError."""
    import pymysql

    from .tunnel import ProbeResult

    conn = pymysql.connections.Connection(host=host, port=port, user=cred.username, password=cred.password,
                                          connect_timeout=timeout, read_timeout=timeout,
                                          write_timeout=timeout, defer_connect=True)
    chan = ChannelSocket(transport.open_channel(host, port, timeout))
    try:
        conn.connect(chan)
        version = conn.get_server_info()
        if on_read_only is not None:
            _report_read_only(conn, on_read_only, host, port)
    except pymysql.err.MySQLError as exc:
        return _login_refusal(exc, host, port)
    except (EOFError, IndexError, ValueError, struct.error) as exc:
        raise TransientError(f"{host}:{port} answered, but not like MySQL ({type(exc).__name__})") from None
    finally:
        if conn.open:
            conn.close()                 # COM_QUIT: a clean end, not an aborted connection
        chan.close()
    return ProbeResult(True, version)


def _report_read_only(conn: Any, on_read_only: Callable[[bool], None], host: str, port: int) -> None:
    import pymysql

    from .aurora import read_only_flags

    try:
        read_only = read_only_flags(conn)
    except pymysql.err.MySQLError as exc:      # the login worked: the path is fine, the role unknown
        log.info("could not read the read-only flags at %s:%d: %s", host, port, exc)
        return
    on_read_only(read_only)


def _login_refusal(exc: Exception, host: str, port: int) -> Any:
    """A server's error is a refusal; a client-side one (2xxx: lost, cannot connect) a dead path."""
    from .tunnel import ProbeResult

    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
    message = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    if code and not 2000 <= code < 3000:
        return ProbeResult(False, message, code)
    raise TransientError(f"no MySQL login at {host}:{port}: {message}") from None


class ChannelSocket:
    """A transport channel as the socket PyMySQL reads and writes (it reads through ``makefile``)."""

    def __init__(self, chan: Any) -> None:
        self._chan = chan

    def settimeout(self, timeout: float | None) -> None:
        if hasattr(self._chan, "settimeout"):
            self._chan.settimeout(timeout)

    def sendall(self, data: bytes) -> None:
        self._chan.sendall(data)

    def makefile(self, mode: str) -> "ChannelSocket":
        return self

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, fewer only at the end of the stream (PyMySQL reports that as lost)."""
        buf = b""
        while len(buf) < n:
            chunk = self._chan.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    def close(self) -> None:
        try:
            self._chan.close()
        except Exception:
            pass


# ----------------------------------------------------------------------------- status events

class StatusPublisher:
    """Publishes ``status`` events when the snapshot changes: on a poke, or at least every STATUS_POLL s."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]], emit: Callable[[str, Any], None],
                 interval: float = STATUS_POLL) -> None:
        self._snapshot = snapshot
        self._emit = emit
        self._interval = interval
        self._wake = threading.Event()
        self._stopped = threading.Event()
        self._last: dict[str, Any] | None = None
        self._thread = threading.Thread(target=self._run, name="status-publisher", daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def poke(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stopped.set()
        self._wake.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(5)

    def _run(self) -> None:
        while not self._stopped.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            if self._stopped.is_set():
                return
            self.publish_if_changed()

    def publish_if_changed(self) -> None:
        try:
            snap = self._snapshot()
        except Exception:
            log.exception("status snapshot failed")
            return
        if snap != self._last:
            self._last = snap
            self._emit("status", snap)
