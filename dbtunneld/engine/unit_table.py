"""The supervisor's tables: the units it runs (the credential engine and a ``ClusterSlot`` per
cluster), the config they were built from, whether a reload is replacing the engine or a stop has
begun, and the lock that guards them. The lock is held to read or change the tables only, never
across I/O (the supervisor, ``unit_steps`` and ``reload`` share one table)."""

from __future__ import annotations

import threading

from ..core.config import Config
from ..core.errors import NeedsUserError, UnknownNameError
from .cluster_slots import ClusterSlot
from .units import EngineUnit


class UnitTable:
    """The engine, the slots by cluster name and the config, guarded by ``lock`` (re-entrant)."""

    def __init__(self, config: Config) -> None:
        self.lock = threading.RLock()
        self.config = config
        self.slots: dict[str, ClusterSlot] = {}
        self.engine: EngineUnit | None = None
        self.reloading = False                   # the engine is being replaced (see ``reload``)
        self.stopping = False

    def require_engine(self) -> EngineUnit:
        """The running engine, else the error that tells the user to try again."""
        if self.reloading and not self.stopping:
            raise NeedsUserError("the daemon is restarting its credentials after a config change",
                                 "run the command again in a few seconds")
        if self.engine is None or self.stopping:
            raise NeedsUserError("the daemon is stopping", "run the command again once it has restarted")
        return self.engine

    def slot(self, name: str) -> ClusterSlot:
        """The named cluster's slot (an engine must be running), else the error naming the known ones."""
        self.require_engine()
        slot = self.slots.get(name)
        if slot is None:
            known = ", ".join(sorted(self.slots)) or "none"
            raise UnknownNameError(f'no cluster named "{name}" (known: {known})')
        return slot

    def is_attached(self, slot: ClusterSlot) -> bool:
        """The slot is still in the table and wanted, and no stop has begun."""
        with self.lock:
            return not self.stopping and self.slots.get(slot.name) is slot and slot.wanted

    def cred_still_used(self, slot: ClusterSlot) -> bool:
        """Another connected tunnel (a cluster and its reader port) shares the slot's DB user."""
        with self.lock:
            return any(s.wanted and s is not slot and s.cred_name == slot.cred_name for s in self.slots.values())
