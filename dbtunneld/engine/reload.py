"""A reload of the config as a reconcile: units whose spec is unchanged keep running, removed or
changed ones are detached under the table's lock and stopped first (freeing their ports, revoking
their leases, or stopping the old engine when the AWS / Vault / credential settings changed), then
the new ones are built, attached under the lock and the wanted ones connected. The lock is held
only to change the table (``unit_table``); every slow part runs outside it (``unit_steps``), so
status answers during a reload. Reloads run one at a time."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from ..core.config import Config
from .cluster_slots import ClusterSlot, ReloadPlan, plan_reload
from .unit_steps import STOP_SLACK, UnitSteps
from .unit_table import UnitTable
from .units import EngineUnit, engine_spec, unit_specs

log = logging.getLogger(__name__)


class Reconciler:
    """Reloads ``table`` to a new config through ``steps``; ``poke`` tells the status publisher."""

    def __init__(self, table: UnitTable, steps: UnitSteps, poke: Callable[[], None]) -> None:
        self._table = table
        self._steps = steps
        self._poke = poke
        self._one_at_a_time: asyncio.Lock | None = None   # created on the engine loop

    def _serial(self) -> asyncio.Lock:
        if self._one_at_a_time is None:
            self._one_at_a_time = asyncio.Lock()
        return self._one_at_a_time

    async def reload(self, new: Config) -> dict[str, list[str]]:
        """Reconcile the running units with ``new`` (validated by the caller); the plan's summary."""
        async with self._serial():
            with self._table.lock:
                plan = self._plan_reload(new)
            await self._retire(plan)
            if not self._table.stopping:
                await self._start_planned(plan, new)
        self._poke()
        return plan.summary

    def _plan_reload(self, new: Config) -> ReloadPlan:
        """Under the lock: detach the units that must stop and note what starts after (no I/O)."""
        table = self._table
        restart = engine_spec(new) != engine_spec(table.config)
        plan = plan_reload(table.slots, new, restart)
        gone = [s.name for s in plan.stop]
        for n in gone:
            del table.slots[n]
        if restart:
            log.info("AWS / Vault / credential settings changed: restarting every unit")
            plan.old_engine, table.engine = table.engine, None
            table.reloading = True
        elif table.engine is not None:
            table.engine.update_config(new)
        return plan

    async def _retire(self, plan: ReloadPlan) -> None:
        """Outside the lock: forget removed clusters, stop the detached tunnels, revoke their leases
        or stop the old engine."""
        steps = self._steps
        bound = steps.bound()
        await steps.blocking(steps.wanted.keep_only, plan.keep)
        await steps.stop_tunnels(plan.stop, time.monotonic() + bound)
        engine = self._table.engine
        if engine is not None:
            await asyncio.gather(*(steps.release(engine, n) for n in plan.release))
        if plan.old_engine is not None:
            steps.forget_engine(plan.old_engine)
            try:
                await steps.blocking(plan.old_engine.stop, bound, timeout=bound + STOP_SLACK)
            except asyncio.TimeoutError:
                log.warning("the old credential engine took over %.0f s to stop; going on", bound + STOP_SLACK)

    async def _start_planned(self, plan: ReloadPlan, new: Config) -> None:
        """Outside the lock: a new engine if the old one was stopped and the new units are built,
        then attached under the lock, then the wanted ones connected."""
        steps, table = self._steps, self._table
        engine = table.engine if table.engine is not None else await steps.start_engine(new)
        specs = unit_specs(new)
        slots = await steps.build_slots([specs[n] for n in plan.start], new, engine)
        late, slots_to_drop = self._attach(engine, slots, new)
        if late or slots_to_drop:             # a stop came while the new units were built
            await steps.stop_tunnels(slots_to_drop, time.monotonic() + steps.bound())
            for eng in late:
                await steps.blocking(eng.stop, steps.bound(), timeout=steps.bound() + STOP_SLACK)
            return
        await steps.connect_slots([s for s in slots if s.name in plan.connect])

    def _attach(self, engine: EngineUnit, slots: list[ClusterSlot],
                new: Config) -> tuple[list[EngineUnit], list[ClusterSlot]]:
        """Under the lock: attach the new units, or (a stop began) return what to stop instead."""
        table = self._table
        with table.lock:
            if table.stopping:
                return ([engine] if engine is not table.engine else []), slots
            table.engine, table.reloading = engine, False
            table.slots.update({s.name: s for s in slots})
            table.config = new
            return [], []
