"""Leases a crashed run left behind: which records nobody owns (``orphans``) and the sweeper that
revokes them once the Vault token is valid (``OrphanSweeper``, a unit of the engine's scheduler: bounded tries within a window; a
lease the policy does not let us revoke is not retried; what is left waits for the next start)."""

from __future__ import annotations

import logging
import math
import os
import random
import threading
import time
from typing import TYPE_CHECKING, Callable

from ..core.model import LeaseOutcome
from ..core.timing import Clock
from .keeper import Tuning
from .lease_store import LeaseRecord, LeaseStore
from .revoke import RevokeTarget, revoke_leases
from .token_keeper import TokenKeeper

if TYPE_CHECKING:
    from .engine_loop import EngineLoop
    from .scheduler import Scheduler

log = logging.getLogger(__name__)


def orphans(records: list[LeaseRecord], me: int | None = None) -> list[LeaseRecord]:
    """Records no running process owns (a live other owner is another instance: leave it alone).
    A zombie owner (killed, not reaped yet) or a pid now used by another program owns nothing."""
    me = os.getpid() if me is None else me
    return [r for r in records if r.pid == me or not r.owner_alive()]


class OrphanSweeper:
    """The orphans of this Vault found at start, and the scheduler unit that revokes them."""

    name = "orphans"

    def __init__(self, store: LeaseStore, vault_address: str, tokens: TokenKeeper, *, clock: Clock,
                 tuning: Tuning, rng: random.Random, revoke_timeout: float, stopping: threading.Event,
                 engine: Callable[[], "EngineLoop"]) -> None:
        self.store = store
        self.tokens = tokens
        self.clock = clock
        self.tuning = tuning
        self.rng = rng
        self.revoke_timeout = revoke_timeout
        self.stopping = stopping
        self._engine = engine
        self.pending = self._find(vault_address)
        self._scheduler: Scheduler | None = None
        self._started_at: float | None = None
        self.attempts = 0

    def _find(self, vault_address: str) -> list[LeaseRecord]:
        """Leases an earlier run left behind in this Vault (others cannot be revoked from here)."""
        found = []
        for record in orphans(self.store.records()):
            if record.vault == vault_address:
                found.append(record)
            else:
                log.info("forgetting lease %s of another Vault (%s); it expires on its own",
                         record.lease_id, record.vault)
                self.store.remove(record.lease_id)
        return found

    def start_once(self, scheduler: Scheduler) -> None:
        """Schedule the sweep (once) when there is something to sweep."""
        if self.pending and self._scheduler is None and not self.stopping.is_set():
            self._scheduler = scheduler
            scheduler.add(self)

    @property
    def finished(self) -> bool:
        """The sweep ran and left the schedule (nothing left, or it gave up until the next start)."""
        return self._scheduler is not None and self not in self._scheduler

    def stop(self) -> None:
        if self._scheduler is not None:
            self._scheduler.remove(self)

    def step(self) -> float:
        """One attempt; at most ``tuning.orphan_tries`` within ``tuning.orphan_window`` s, then the
        unit leaves the schedule (what is left waits for the next start)."""
        if not self.pending or self.stopping.is_set():
            return self._done()
        if self._started_at is None:
            self._started_at = self.clock.time()
        self.sweep_once()
        self.attempts += 1
        if not self.pending:
            return self._done()
        delay = self.tuning.backoff.delay(self.attempts - 1, self.rng.random())
        spent = self.clock.time() - self._started_at
        if self.attempts >= self.tuning.orphan_tries or spent + delay > self.tuning.orphan_window:
            log.warning("giving up on %d orphaned lease(s) after %d tries in %.0f s; the next start tries again",
                        len(self.pending), self.attempts, spent)
            return self._done()
        log.warning("%d orphaned lease(s) not revoked yet; retry %d in %.1f s", len(self.pending), self.attempts, delay)
        return delay

    def _done(self) -> float:
        self.stop()
        return math.inf

    def sweep_once(self) -> list[LeaseOutcome]:
        """One attempt at the orphans (also for callers that run the engine without a driver);
        returns the outcomes. Retried ones stay orphans; revoked and denied ones are done."""
        records = list(self.pending)
        targets = [RevokeTarget(r.lease_id, r.cluster, r.username) for r in records]
        outcomes = revoke_leases(targets, self.tokens, self.store, time.monotonic() + self.revoke_timeout,
                                 self._engine())
        retry = {o.lease_id for o in outcomes if o.retried}
        self.pending = [r for r in records if r.lease_id in retry]
        return outcomes
