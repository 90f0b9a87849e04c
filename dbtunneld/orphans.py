"""Leases a crashed run left behind: which records nobody owns (``orphans``) and the sweeper that
revokes them once the Vault token is valid (``OrphanSweeper``: bounded tries within a window; a
lease the policy does not let us revoke is not retried; what is left waits for the next start)."""

from __future__ import annotations

import logging
import os
import random
import threading
import time

from .keeper import Tuning
from .lease_store import LeaseRecord, LeaseStore
from .model import LeaseOutcome
from .revoke import RevokeTarget, revoke_leases
from .timing import Clock
from .token_keeper import TokenKeeper

log = logging.getLogger(__name__)


def orphans(records: list[LeaseRecord], me: int | None = None) -> list[LeaseRecord]:
    """Records no running process owns (a live other owner is another instance: leave it alone).
    A zombie owner (killed, not reaped yet) or a pid now used by another program owns nothing."""
    me = os.getpid() if me is None else me
    return [r for r in records if r.pid == me or not r.owner_alive()]


class OrphanSweeper:
    """The orphans of this Vault found at start, and the one thread that revokes them."""

    def __init__(self, store: LeaseStore, vault_address: str, tokens: TokenKeeper, *, clock: Clock,
                 tuning: Tuning, rng: random.Random, revoke_timeout: float, stopping: threading.Event) -> None:
        self.store = store
        self.tokens = tokens
        self.clock = clock
        self.tuning = tuning
        self.rng = rng
        self.revoke_timeout = revoke_timeout
        self.stopping = stopping
        self.pending = self._find(vault_address)
        self.thread: threading.Thread | None = None

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

    def start_once(self) -> None:
        """Start the sweep thread (once) when there is something to sweep."""
        if self.pending and self.thread is None and not self.stopping.is_set():
            self.thread = threading.Thread(target=self.run, name="dbtunneld-orphans", daemon=True)
            self.thread.start()

    def join(self, timeout: float) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def run(self) -> None:
        """Revoke the orphans: at most ``tuning.orphan_tries`` attempts within ``tuning.orphan_window`` s."""
        started, attempt = self.clock.time(), 0
        while self.pending and not self.stopping.is_set():
            self.sweep_once()
            attempt += 1
            if not self.pending:
                return
            delay = self.tuning.backoff.delay(attempt - 1, self.rng.random())
            if attempt >= self.tuning.orphan_tries or self.clock.time() + delay - started > self.tuning.orphan_window:
                log.warning("giving up on %d orphaned lease(s) after %d tries in %.0f s; the next start tries again",
                            len(self.pending), attempt, self.clock.time() - started)
                return
            log.warning("%d orphaned lease(s) not revoked yet; retry %d in %.1f s", len(self.pending), attempt, delay)
            self.clock.wait(self.stopping, delay)

    def sweep_once(self) -> list[LeaseOutcome]:
        """One attempt at the orphans (also for callers that run the engine without threads);
        returns the outcomes. Retried ones stay orphans; revoked and denied ones are done."""
        records = list(self.pending)
        targets = [RevokeTarget(r.lease_id, r.cluster, r.username) for r in records]
        outcomes = revoke_leases(targets, self.tokens, self.store, time.monotonic() + self.revoke_timeout)
        retry = {o.lease_id for o in outcomes if o.retried}
        self.pending = [r for r in records if r.lease_id in retry]
        return outcomes
