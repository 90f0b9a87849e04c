"""Building, starting and stopping the supervisor's units on the engine loop: the credential engine
(built by its factory, attached to the loop and schedule, checked after a sleep), a cluster's slot
(its tunnel on its stable port), connecting slots, stopping tunnels in parallel and releasing a
cluster's leases. Each step is a coroutine on the engine loop whose blocking part runs on the
loop's pool with a deadline; the table (``unit_table``) is locked only to read or change it."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any, Callable, Iterable, TypeVar

from ..core.config import Config
from ..core.errors import DbtunneldError
from ..core.paths import Paths
from .cluster_slots import ClusterSlot
from .engine_loop import EngineLoop
from .scheduler import Scheduler
from .unit_table import UnitTable
from .units import EngineFactory, EngineUnit, TunnelFactory, UnavailableTunnel, UnitSpec
from .wake import Checkable, WakeDetector
from .wanted import WantedSet

log = logging.getLogger(__name__)

BLOCKING_TIMEOUT = 30.0           # a blocking call of a command (build a unit, start it) gives up after this
STOP_SLACK = 5.0                  # on top of a stop's own bound

T = TypeVar("T")


class UnitSteps:
    """The steps the supervisor's commands and its reload are made of (coroutines on ``loop``)."""

    def __init__(self, table: UnitTable, paths: Paths, *, loop: EngineLoop, scheduler: Scheduler,
                 wake: WakeDetector, wanted: WantedSet, engine_factory: EngineFactory,
                 tunnel_factory: TunnelFactory, on_engine_event: Callable[[str, Any], None],
                 poke: Callable[[], None]) -> None:
        self.table = table
        self.paths = paths
        self.wanted = wanted
        self._loop = loop
        self._scheduler = scheduler
        self._wake = wake
        self._engine_factory = engine_factory
        self._tunnel_factory = tunnel_factory
        self._on_engine_event = on_engine_event
        self._poke = poke

    def bound(self) -> float:
        """How long stopping a unit or revoking its leases may take (``revoke_timeout``)."""
        return self.table.config.credentials.revoke_timeout

    async def blocking(self, fn: Callable[..., T], *args: Any, timeout: float = BLOCKING_TIMEOUT) -> T:
        return await self._loop.run_blocking(fn, *args, timeout=timeout)

    # ---- the engine

    async def start_engine(self, config: Config) -> EngineUnit:
        """Build and start the engine on this loop and schedule; one that can re-check its expiries
        is checked after a sleep."""
        engine = await self.blocking(self._engine_factory, config, self.paths, self._on_engine_event)
        attach = getattr(engine, "attach", None)
        if callable(attach):
            attach(self._loop, self._scheduler)
        await self.blocking(engine.start)
        if isinstance(engine, Checkable):
            self._wake.register(engine)
        return engine

    def forget_engine(self, engine: EngineUnit) -> None:
        """No more checks of ``engine`` after a sleep (it is being stopped)."""
        self._wake.unregister(engine)

    async def release(self, engine: EngineUnit, name: str) -> list[dict[str, Any]]:
        """Revoke a cluster's leases (the engine bounds it by ``revoke_timeout``; this deadline only
        guards against an engine that does not)."""
        try:
            return await self.blocking(engine.release, name, timeout=self.bound() + STOP_SLACK) or []
        except asyncio.TimeoutError:
            log.warning("[cluster=%s] releasing the credentials took over %.0f s; going on", name,
                        self.bound() + STOP_SLACK)
            return []

    # ---- slots

    async def build_slots(self, specs: list[UnitSpec], config: Config, engine: EngineUnit) -> list[ClusterSlot]:
        return [await self.blocking(self._new_slot, spec, config, engine) for spec in specs]

    def _new_slot(self, spec: UnitSpec, config: Config, engine: EngineUnit) -> ClusterSlot:
        """Build a cluster's tunnel on its stable port; a port problem is the unit's failed state."""
        try:
            port = self._port_for(spec, config)
            tunnel = self._tunnel_factory(spec, port, engine, self._poke)
        except DbtunneldError as exc:
            log.warning("[cluster=%s] cannot build the tunnel: %s", spec.cluster.name, exc.message)
            tunnel = UnavailableTunnel(spec.cluster.name, spec.cluster.local_port or 0, exc)
        attach = getattr(tunnel, "attach_scheduler", None)
        if callable(attach):
            attach(self._scheduler, self._loop)   # its keeper: a unit of the engine's schedule, clients on its loop
        return ClusterSlot(spec, tunnel)

    def _port_for(self, spec: UnitSpec, config: Config) -> int:
        from ..adapters.ports import PortBook

        pinned = [c.local_port for c in config.clusters if c.local_port and c.name != spec.cluster.name]
        book = PortBook(self.paths.ports_file, spec.tunnels.port_range)
        return book.port_for(spec.cluster.name, spec.cluster.local_port, reserved=pinned)

    async def connect_slots(self, slots: list[ClusterSlot]) -> None:
        """Mark the slots wanted (under the lock), then start them (outside it)."""
        with self.table.lock:
            engine = self.table.require_engine()
            for slot in slots:
                slot.wanted = True
        if slots:
            await self.blocking(self.wanted.add, [s.name for s in slots])
        for slot in slots:
            await self.blocking(self._start_slot, slot, engine)

    def _start_slot(self, slot: ClusterSlot, engine: EngineUnit) -> None:
        """On the worker pool: want the credentials, start the tunnel (undone if it was detached meanwhile)."""
        cluster = slot.spec.cluster
        engine.want(replace(cluster, name=slot.cred_name) if cluster.reader_of else cluster)
        slot.tunnel.start()
        if not self.table.is_attached(slot):     # a stop or disconnect came while it started
            slot.tunnel.stop(self.bound())
            return
        self._wake.register(slot.tunnel)
        log.info("[cluster=%s] connect requested (127.0.0.1:%s)", slot.name, slot.spec.cluster.local_port or "auto")

    async def stop_tunnels(self, slots: Iterable[ClusterSlot], deadline: float) -> None:
        """Stop the tunnels in parallel, each bounded by ``deadline`` (a wedged transport is left
        to end its call in the background)."""
        slots = list(slots)
        for slot in slots:
            self._wake.unregister(slot.tunnel)
        await asyncio.gather(*(self._stop_slot(s, deadline) for s in slots))

    async def _stop_slot(self, slot: ClusterSlot, deadline: float) -> None:
        left = max(0.5, deadline - time.monotonic())
        try:
            await self.blocking(slot.tunnel.stop, left, timeout=left + 0.5)
        except asyncio.TimeoutError:
            log.warning("[cluster=%s] tunnel stop took over %.1f s; going on", slot.name, left)
        except Exception:
            log.exception("[cluster=%s] tunnel stop failed", slot.name)
