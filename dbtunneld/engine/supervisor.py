"""The supervisor: builds the engine's units from a config and keeps them matching it.

It owns one credential engine (AWS session, Vault token, a DB lease per connected cluster)
and one tunnel unit per cluster. ``connect`` = want the cluster's credentials + start its
tunnel; ``disconnect`` = stop the tunnel + revoke the lease. What the user connected is kept
in ``wanted.json`` (``wanted.WantedSet``) and connected again at the next start (after a crash,
a quit or a reboot). ``reload`` is a reconcile: units whose spec is unchanged keep running,
removed or changed ones stop first (freeing their ports), then new ones start (``reload``,
``cluster_slots``). The engine, the slots and the config are one table (``unit_table``) under one
lock; units are built, started and stopped by ``unit_steps``. Commands are coroutines on the engine loop (``engine_loop``); the slow parts run on its pool,
outside the lock, so status answers meanwhile. Keepers, tunnels and the wake detector are units
of one ``scheduler.Scheduler`` driven on that loop. Status events come from ``status_publisher``.
The engine and tunnels are built by factories (``wiring``; seams in ``units``), so tests of the
orchestration use fakes. New credentials or a sign-in, and a sleep (``wake.WakeDetector``),
check the waiting tunnels and the engine at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import time
from typing import Any, Callable, Coroutine, Iterable, TypeVar

from .. import __version__
from ..core import model
from ..core.config import ClusterConfig, Config
from ..core.errors import NeedsUserError
from .engine_loop import EngineLoop, LoopClosedError
from .cluster_slots import LOCALHOST, ClusterSlot, ReloadPlan, connection_strings, credential_problem
from ..core.model import DaemonStatus, DbCredentials, TunnelState
from ..core.paths import Paths
from .local_login import local_user
from .reload import Reconciler
from .scheduler import Scheduler
from .status_publisher import StatusPublisher
from .unit_steps import STOP_SLACK, UnitSteps
from .unit_table import UnitTable
from .units import EngineFactory, EngineUnit, TunnelFactory, unit_specs
from ..core.timing import SYSTEM_CLOCK, Clock
from .wake import WakeDetector
from .wanted import WantedSet

log = logging.getLogger(__name__)

__all__ = ["Supervisor", "ClusterSlot", "ReloadPlan", "connection_strings", "credential_problem", "LOCALHOST"]

CREDS_WAIT = 20.0                 # creds() waits this long for a lease being minted
SETTLED = {TunnelState.UP, TunnelState.FAILED, TunnelState.NEEDS_SIGN_IN, TunnelState.STOPPED}
POOL_WORKERS = 32                 # blocking calls of the engine loop: tunnel steps, keeper steps, revokes
RENEW_TIMEOUT = 15.0              # renew / rotate waits this long for the keeper to serve it
START_TIMEOUT = 120.0             # the engine and every unit built and the autoconnect ones started
COMMAND_TIMEOUT = 60.0            # a command's wrapper waits this long plus its revoke bounds

T = TypeVar("T")

# ----------------------------------------------------------------------------- the supervisor

class Supervisor:
    """Owns the engine and the tunnels. Its commands are coroutines on the engine loop (blocking
    parts on its worker pool, each with a deadline); the public methods are their synchronous
    wrappers, safe from any thread but the loop's own. The table's lock guards the table only
    (``unit_table``) and is never held across I/O, so ``status`` answers while a command waits for
    Vault. Building, starting and stopping units are ``unit_steps``; a reload is ``reload``."""

    def __init__(self, config: Config, paths: Paths, *, engine_factory: EngineFactory,
                 tunnel_factory: TunnelFactory, on_event: Callable[[str, Any], None] | None = None,
                 config_path: str = "", clock: Clock = SYSTEM_CLOCK,
                 wake: WakeDetector | None = None, engine_loop: EngineLoop | None = None) -> None:
        self.paths = paths
        self.config_path = config_path or config.source
        self._emit = on_event or (lambda event, data: None)
        self._clock = clock
        self.started_at = clock.time()
        self._table = UnitTable(config)          # the engine, the slots, the config; its lock
        self._loop = engine_loop or EngineLoop(name="dbtunneld-engine", workers=POOL_WORKERS)
        self._owns_loop = engine_loop is None
        self.scheduler = Scheduler(clock)        # every keeper, tunnel and the wake detector
        self._driver: concurrent.futures.Future[None] | None = None
        self._publisher = StatusPublisher(self.status_dict, self._emit)
        self._wake = wake or WakeDetector(clock=clock)      # checks connected tunnels and the engine after a sleep
        self._wanted = WantedSet(paths.wanted_file)   # what the user connected, across restarts
        self._steps = UnitSteps(self._table, paths, loop=self._loop, scheduler=self.scheduler, wake=self._wake,
                                wanted=self._wanted, engine_factory=engine_factory, tunnel_factory=tunnel_factory,
                                on_engine_event=self._engine_event, poke=self._publisher.poke)
        self._reconciler = Reconciler(self._table, self._steps, self._publisher.poke)
        self._stopped = False

    @property
    def engine_loop(self) -> EngineLoop:
        return self._loop

    @property
    def config(self) -> Config:
        return self._table.config

    @property
    def stopping(self) -> bool:
        return self._table.stopping

    # read views of the table (the tests look at them)

    @property
    def _engine(self) -> EngineUnit | None:
        return self._table.engine

    @property
    def _slots(self) -> dict[str, ClusterSlot]:
        return self._table.slots

    # ---- running commands on the loop

    def _run(self, coro: Coroutine[Any, Any, T], timeout: float) -> T:
        """A command's synchronous wrapper (callers on other threads: daemon dispatch, tests)."""
        try:
            return self._loop.run(coro, timeout)
        except LoopClosedError:
            raise NeedsUserError("the daemon is stopping", "run the command again once it has restarted") from None

    def _bound(self) -> float:
        return self._steps.bound()

    # ---- lifecycle

    def start(self, autoconnect: bool = True) -> None:
        """Start the engine (it revokes orphans of a crashed run), build the units, and connect the
        ``autoconnect`` clusters and those the user had connected before the last stop or crash."""
        self._loop.start()
        self._driver = self._loop.submit(self.scheduler.drive(self._loop))
        auto = self._run(self._start(autoconnect), START_TIMEOUT)
        self._publisher.start(self._loop)
        self._wake.start(self.scheduler)
        log.info("supervisor started: %d clusters, %d connected at start (%s)", len(self._table.slots), len(auto),
                 ", ".join(f"{s.name}: {'autoconnect' if s.spec.cluster.autoconnect else 'connected before'}"
                           for s in auto) or "none")

    async def _start(self, autoconnect: bool) -> list[ClusterSlot]:
        engine = await self._steps.start_engine(self._table.config)
        slots = await self._steps.build_slots(list(unit_specs(self._table.config).values()), self._table.config, engine)
        with self._table.lock:
            self._table.engine = engine
            self._table.slots.update({s.name: s for s in slots})
        await self._steps.blocking(self._wanted.keep_only, dict(self._table.slots))
        restored = self._wanted.names() if autoconnect else set()
        auto = [s for s in slots if s.spec.cluster.autoconnect or s.name in restored] if autoconnect else []
        await self._steps.connect_slots(auto)
        return auto

    def stop(self, timeout: float = 15.0) -> list[dict[str, Any]]:
        """Stop every tunnel, then revoke every lease and the token (bounded by ``timeout``);
        returns what became of each DB user (``model.LeaseOutcome`` dicts). Idempotent."""
        with self._table.lock:
            if self._stopped:
                return []
            self._stopped = True
        try:
            outcomes = self._run(self._stop(time.monotonic() + timeout), timeout + STOP_SLACK)
        except concurrent.futures.TimeoutError:
            log.warning("supervisor: stop took over %.0f s; ending anyway", timeout + STOP_SLACK)
            outcomes = []
        self._wake.stop()
        self._publisher.stop()
        if self._driver is not None:
            self._driver.cancel()
        if self._owns_loop:
            self._loop.stop(timeout=2.0)
        log.info("supervisor stopped")
        return outcomes

    async def _stop(self, deadline: float) -> list[dict[str, Any]]:
        with self._table.lock:
            self._table.stopping = True
            slots = list(self._table.slots.values())
            self._table.slots.clear()
            engine, self._table.engine = self._table.engine, None
        await self._steps.stop_tunnels(slots, deadline)
        if engine is None:
            return []
        self._wake.unregister(engine)
        left = max(1.0, deadline - time.monotonic())
        return await self._steps.blocking(engine.stop, left, timeout=left + STOP_SLACK) or []

    def _engine_event(self, event: str, data: Any = None) -> None:
        """Engine events go out as they are; new credentials or a sign-in wake the waiting tunnels."""
        self._emit(event, data)
        kind = data.get("kind", "") if isinstance(data, dict) else ""
        if kind in ("db.minted", "db.rotated", "sso.signed_in", "vault.login"):
            name = data.get("name") if kind.startswith("db.") else None
            for slot in list(self._table.slots.values()):
                if slot.wanted and name in (None, slot.name):
                    slot.tunnel.check_now()
        self._publisher.poke()

    # ---- commands

    def connect(self, names: Iterable[str] | None = None, wait: float = 0.0) -> list[dict[str, Any]]:
        """Connect the named clusters (all when ``names`` is None); wait up to ``wait`` s for them to settle."""
        chosen = self._run(self._connect(None if names is None else list(names)), COMMAND_TIMEOUT + 3 * self._bound())
        return self._settle(chosen, wait)

    async def _connect(self, names: list[str] | None) -> list[str]:
        """Not serialised with a reload (a connect during a reload that waits for Vault answers at
        once): a slot a reload detaches meanwhile is stopped again by ``UnitSteps.connect_slots``."""
        with self._table.lock:
            slots = [self._table.slot(n) for n in names] if names is not None else list(self._table.slots.values())
        await self._steps.connect_slots(slots)
        self._publisher.poke()
        return [s.name for s in slots]

    def disconnect(self, names: Iterable[str] | None = None) -> list[str]:
        """Stop the tunnels and revoke the leases of the named clusters (all when None)."""
        return list(self.disconnect_report(names)["disconnected"])

    def disconnect_report(self, names: Iterable[str] | None = None) -> dict[str, Any]:
        """``disconnect``, answered with what became of each DB user:
        ``{"disconnected": [names], "revocation": [model.LeaseOutcome dicts]}``."""
        return self._run(self._disconnect(None if names is None else list(names)), COMMAND_TIMEOUT + 3 * self._bound())

    async def _disconnect(self, names: list[str] | None) -> dict[str, Any]:
        with self._table.lock:
            slots = ([self._table.slot(n) for n in names] if names is not None
                     else [s for s in self._table.slots.values() if s.wanted])
            engine = self._table.require_engine()
            for slot in slots:
                slot.wanted = False
        await self._steps.blocking(self._wanted.discard, [s.name for s in slots])
        # Outside the lock: stopping and revoking take up to the revoke bound; status readers go on.
        await self._steps.stop_tunnels(slots, time.monotonic() + self._bound())
        release = sorted({s.cred_name for s in slots if not self._table.cred_still_used(s)})
        results = await asyncio.gather(*(self._steps.release(engine, name) for name in release))
        for slot in slots:
            log.info("[cluster=%s] disconnected", slot.name)
        self._publisher.poke()
        return {"disconnected": [s.name for s in slots], "revocation": [o for r in results for o in r]}

    def reconnect(self, names: Iterable[str] | None = None) -> list[str]:
        """Rebuild the upstream of connected tunnels now (the listener stays bound)."""
        return self._run(self._reconnect(None if names is None else list(names)), COMMAND_TIMEOUT)

    def _connected(self, names: list[str] | None) -> list[ClusterSlot]:
        """The named slots, each connected (else the error that says so); all connected ones for None."""
        with self._table.lock:
            slots = ([self._table.slot(n) for n in names] if names is not None
                     else [s for s in self._table.slots.values() if s.wanted])
        for slot in slots:
            if not slot.wanted:
                raise NeedsUserError(f'cluster "{slot.name}" is not connected', f"run `dbtunneld connect {slot.name}`")
        return slots

    async def _reconnect(self, names: list[str] | None) -> list[str]:
        slots = self._connected(names)
        for slot in slots:
            await self._steps.blocking(slot.tunnel.reconnect)
        self._publisher.poke()
        return [s.name for s in slots]

    def renew(self, name: str | None = None, rotate: bool = False) -> list[str]:
        """Renew the leases of one cluster, or of every connected one, now (``rotate``: mint new
        DB users; with login = "local" saved logins keep working)."""
        return self._run(self._renew(name, rotate), COMMAND_TIMEOUT + RENEW_TIMEOUT)

    async def _renew(self, name: str | None, rotate: bool) -> list[str]:
        slots = self._connected(None if name is None else [name])
        engine = self._table.require_engine()
        await asyncio.gather(*(self._steps.blocking(engine.renew_now, n, rotate, timeout=RENEW_TIMEOUT)
                               for n in sorted({s.cred_name for s in slots})))
        self._publisher.poke()
        return [s.name for s in slots]

    def aws_session(self) -> Any:
        """The engine's boto3 session (credentials kept fresh by it); NeedsUserError before sign-in."""
        return self._table.require_engine().session_factory()

    def login(self, wait: float = 0.0, use_device_code: bool = False) -> dict[str, Any]:
        return self._table.require_engine().sso_login(wait, use_device_code)

    def creds(self, name: str, field: str = "username", wait: float = CREDS_WAIT) -> dict[str, Any]:
        """Username, connection strings and expiry; the password only when ``field == "password"``."""
        slot = self._table.slot(name)
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
        return getattr(self._table.engine, "local_passwords", None) if c.login == "local" else None

    def reset_local_password(self, name: str) -> dict[str, Any]:
        """A new local password for the cluster (saved logins need it); open sessions go on."""
        slot = self._table.slot(name)
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
            seen = self._publisher.changes
            cred = self._table.require_engine().current(name)
            if cred is not None:
                return cred
            problem = self._credential_problem(name)
            if problem is not None or time.monotonic() >= deadline:
                raise problem or NeedsUserError(f'no credentials for "{name}" yet',
                                                "see `dbtunneld status` for what the daemon is waiting for")
            self._publisher.wait_change(seen, deadline - time.monotonic())

    def _credential_problem(self, name: str) -> Exception | None:
        return credential_problem(self._table.require_engine().credential_status(), name)

    def _settle(self, names: list[str], wait: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + wait
        while True:
            seen = self._publisher.changes
            snap = {t.name: t for t in self.status().tunnels if t.name in names}
            settled = all(t.state in SETTLED and (t.state != TunnelState.UP or t.username) for t in snap.values())
            if settled or time.monotonic() >= deadline:
                return [snap[n].to_dict() for n in names if n in snap]
            self._publisher.wait_change(seen, deadline - time.monotonic())

    # ---- reload

    def reload(self, new: Config) -> dict[str, list[str]]:
        """Reconcile the running units with ``new`` (already validated by the caller).

        The lock is held only to change the table (``reload.Reconciler`` detaches, then attaches):
        stopping tunnels, revoking leases, stopping and starting an engine and building
        and starting units (each up to ``revoke_timeout``, longer when Vault hangs) run outside it,
        so ``status`` answers at once during a reload. Reloads run one at a time."""
        bound = COMMAND_TIMEOUT + 4 * max(self._bound(), new.credentials.revoke_timeout)
        summary = self._run(self._reconciler.reload(new), bound)
        log.info("reloaded config: %s", ", ".join(f"{k} {v}" for k, v in summary.items() if v) or "no change")
        return summary

    # ---- status

    def status(self) -> DaemonStatus:
        with self._table.lock:
            slots, engine = list(self._table.slots.values()), self._table.engine
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
