"""``LeaseKeeper``: one cluster's DB users, kept by one retry loop (``keeper.Keeper``): mint
``database/creds/<role>``, renew, mint a successor before the lease's end (its max TTL, or the end
of the token that minted it), keep the old lease renewed until it expires, revoke on release."""

from __future__ import annotations

import logging
import math
import os
import random
import time
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Callable

from ..adapters import log as dlog
from ..adapters.vault import LeaseGrant, VaultClient, VaultRequestError
from ..core.config import ClusterConfig, VaultConfig
from ..core.errors import DbtunneldError, PermissionDeniedError, TransientError
from ..core.model import CredentialState, CredentialStatus, DbCredentials, LeaseOutcome
from ..core.paths import my_identity
from ..core.timing import Clock, Lifetime, jittered_grace, plan_next, renewal_capped, replace_time, retry_within
from .keeper import CredentialEvent, Keeper, Tuning, finite, short_error
from .lease_store import LeaseRecord, LeaseStore
from .revoke import RevokeTarget, revoke_leases
from .token_keeper import TokenKeeper, TokenView

if TYPE_CHECKING:
    from .engine_loop import EngineLoop

log = logging.getLogger(__name__)

S = CredentialState

# DB leases per cluster


@dataclass
class _Lease:
    grant: LeaseGrant
    token_accessor: str
    expires_at: float
    increment: float
    renewable: bool
    grace: float
    max_known: float | None = None
    retired: bool = False
    probed: bool = False          # asked the token keeper to reveal the minting token's end
    action: str = "renew"
    next_at: float = 0.0
    attempt: int = 0

    @property
    def lease_id(self) -> str:
        return self.grant.lease_id


class LeaseKeeper(Keeper):
    """One cluster's DB users: mint, renew, rotate before the end, revoke on release."""

    kind = "db"

    def __init__(self, cluster: ClusterConfig, tokens: TokenKeeper, store: LeaseStore,
                 make_vault: Callable[[VaultConfig], VaultClient], *, clock: Clock,
                 emit: Callable[[CredentialEvent], None], tuning: Tuning, mint_ahead: float, rng: random.Random,
                 engine: Callable[[], "EngineLoop"]) -> None:
        super().__init__(cluster.name, clock, emit)
        self._engine = engine          # the engine loop, for parallel revokes with a deadline
        self.cluster = cluster
        self.tokens = tokens
        self.store = store
        self.vault = make_vault(tokens.config)
        self.tuning = tuning
        self.mint_ahead = mint_ahead
        self.rng = rng
        self.ulog = dlog.unit_logger(log, db=cluster.name)
        self._leases: list[_Lease] = []
        self._learned_lifetime: float | None = None
        self._mint_at = clock.time()
        self._mint_attempt = 0
        self._failure: DbtunneldError | None = None
        self.mints = 0
        self.renewals = 0
        self._renew_requests = 0      # tickets handed out (any thread, under ``_cond``)
        self._rotate_requested = False
        self._mint_requested = False  # a sign-in happened: try minting now (any thread, under ``_cond``)
        self._renew_taken = 0         # tickets the keeper's step has applied (keeper thread only)
        self._renew_done = 0          # tickets served (a step that applied them has finished)
        self._seen_generation = -1

    # -- what others read

    def current(self) -> DbCredentials | None:
        with self._cond:
            lease = self._current()
            if lease is None:
                return None
            g = lease.grant
            return DbCredentials(g.username, g.password, lease.expires_at, cluster=self.name, lease_id=g.lease_id,
                                 max_expires_at=finite(self._end(lease)), issued_at=g.issued_at)

    def _current(self) -> _Lease | None:
        now = self.clock.time()
        live = [lz for lz in self._leases if not lz.retired and lz.expires_at > now
                and (self.tokens.max_expiry(lz.token_accessor) or math.inf) > now]
        return live[-1] if live else None

    def leases(self) -> list[_Lease]:
        with self._cond:
            return list(self._leases)

    def take_leases(self) -> list[_Lease]:
        """Hand every lease over (to be revoked); the keeper holds none afterwards."""
        with self._cond:
            leases, self._leases = self._leases, []
            return leases

    def wait_credentials(self, timeout: float) -> DbCredentials:
        end = time.monotonic() + timeout
        with self._cond:
            while True:
                creds = self.current()
                if creds is not None:
                    return creds
                self._raise_if_blocked()
                left = end - time.monotonic()
                if left <= 0 or self.stopping:
                    raise TransientError(f'no credentials for cluster "{self.name}" yet'
                                         f" ({self.status().last_error or 'still minting'})",
                                         hint="dbtunneld keeps retrying; see `dbtunneld status`")
                self._cond.wait(min(left, 0.5))

    def _raise_if_blocked(self) -> None:
        if self._current() is None and self.tokens.current() is None:
            return self.tokens.raise_if_blocked()   # waiting for a token: its problem is ours
        st = self._status
        if st.state == S.FAILED and self._failure is not None:
            raise self._failure

    def status(self) -> CredentialStatus:
        """The lease's status; while it waits for a token, the token's problem is its problem."""
        st = super().status()
        if st.state in (S.IDLE, S.REVOKED, S.VALID) or self._current() is not None or self.tokens.current() is not None:
            return st
        tst = self.tokens.status()
        state = tst.state if tst.state in (S.NEEDS_SIGN_IN, S.FAILED, S.BACKOFF) else st.state
        return replace(st, state=state, last_error=tst.last_error or st.last_error)

    def request_renewal(self, rotate: bool = False) -> int:
        """Ask the keeper (from any thread) to renew now, or to rotate; returns a ticket for
        ``wait_renewal``. Only the keeper's own step touches its leases (``_take_requests``), so a
        request that arrives during a renewal is served by the next step, not overwritten."""
        with self._cond:
            self._renew_requests += 1
            self._rotate_requested = self._rotate_requested or rotate
            ticket = self._renew_requests
        self.wake()
        return ticket

    def mint_soon(self) -> None:
        """From any thread (after a sign-in): if no lease is held, try minting at the next step."""
        with self._cond:
            self._mint_requested = True
        self.wake()

    def wait_renewal(self, ticket: int, timeout: float) -> bool:
        end = time.monotonic() + timeout
        with self._cond:
            while self._renew_done < ticket:
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    # -- lifetimes

    def _end(self, lease: _Lease) -> float | None:
        """When the lease surely ends: its max TTL or the end of the token that minted it."""
        ends = []
        if lease.max_known is not None:
            ends.append(lease.max_known)
        elif self._learned_lifetime is not None:
            ends.append(lease.grant.issued_at + self._learned_lifetime)
        token_end = self.tokens.max_expiry(lease.token_accessor)
        if token_end is not None:
            ends.append(token_end)
        return min(ends) if ends else None

    def _lifetime(self, lease: _Lease) -> Lifetime:
        return Lifetime(lease.grant.issued_at, lease.expires_at, lease.increment, lease.renewable, self._end(lease))

    # -- the loop

    def run_once(self) -> float:
        self.steps += 1
        now = self.clock.time()
        self._follow_token(now)
        self._drop_expired(now)
        taken = self._take_requests(now)
        if self._current() is None and now >= self._mint_at:
            self._mint()
        for lease in list(self._leases):
            if lease.next_at <= self.clock.time() and lease in self._leases:
                self._act(lease)
        self._finish_renewal_requests(taken)
        return max(0.0, self._next_wake() - self.clock.time())

    def _follow_token(self, now: float) -> None:
        """A new token, or a token end now known: mint if waiting, rotate sooner if needed."""
        generation = self.tokens.generation
        if generation == self._seen_generation:
            return
        self._seen_generation = generation
        if self._current() is None:
            self._mint_at = min(self._mint_at, now)
        current = self._current()
        if current is not None and current.attempt == 0:
            at = replace_time(self._lifetime(current), self.mint_ahead)
            if at is not None and at < current.next_at:
                current.action, current.next_at = "rotate", max(now, at)

    def _next_wake(self) -> float:
        times = [lz.next_at for lz in self._leases] + [lz.expires_at for lz in self._leases]
        if self._current() is None:
            times.append(self._mint_at)
        return min(times) if times else math.inf

    def _take_requests(self, now: float) -> int:
        """Apply the renew/rotate requests made before this step; returns the last ticket applied."""
        with self._cond:
            upto, rotate, mint = self._renew_requests, self._rotate_requested, self._mint_requested
            self._rotate_requested = self._mint_requested = False
        if mint:
            self._mint_at = now
        if upto == self._renew_taken:
            return upto
        self._renew_taken = upto
        lease = self._current()
        if lease is None or rotate:
            self._mint_at = now
            if lease is not None:  # asked for: mint now, without probing the token first
                lease.action, lease.next_at, lease.probed = "rotate", now, True
        else:
            lease.action, lease.next_at, lease.attempt = "renew", now, 0
        return upto

    def _finish_renewal_requests(self, taken: int) -> None:
        """The requests applied at the start of this step are served: wake their waiters."""
        with self._cond:
            if self._renew_done < taken:
                self._renew_done = taken
                self._cond.notify_all()

    def _drop_expired(self, now: float) -> None:
        for lease in [lz for lz in self._leases if lz.expires_at <= now]:
            with self._cond:
                self._leases.remove(lease)
            self.store.remove(lease.lease_id)
            self.ulog.info("lease of user %s expired (Vault drops the user)", lease.grant.username)
            self._emit("db.expired", detail=f"user {lease.grant.username}")
        if self._current() is None and self._status.state == S.VALID:
            self._set_status(state=S.ACQUIRING, identity="", expires_at=None)

    def _act(self, lease: _Lease) -> None:
        if lease.action == "renew":
            self._renew(lease)
        elif lease.action == "rotate":
            self._rotate(lease)
        else:  # "expire": a retired lease nobody renews any more
            lease.next_at = lease.expires_at

    def _plan(self, lease: _Lease) -> None:
        plan = plan_next(self.clock.time(), self._lifetime(lease), lease.grace, self.mint_ahead)
        lease.attempt = 0
        if plan.action == "renew":
            lease.action, lease.next_at = "renew", plan.at
        elif lease.retired or plan.action == "hold":
            lease.action, lease.next_at = "expire", lease.expires_at
        else:
            lease.action, lease.next_at = "rotate", plan.at
        if not lease.retired:
            self._set_status(next_action_at=finite(lease.next_at))

    # -- mint

    def _mint(self) -> None:
        view = self.tokens.current()
        if view is None:
            return self._wait_for_token()
        if not self._leases:
            self._set_status(state=S.ACQUIRING)
        self.vault.use_token(view.secret)
        try:
            grant = self.vault.database_creds(self.cluster.db_role)
        except TransientError as exc:
            return self._mint_failed(exc, S.BACKOFF)
        except PermissionDeniedError as exc:
            self.tokens.check_soon()
            return self._mint_failed(exc, S.FAILED)
        except DbtunneldError as exc:
            return self._mint_failed(exc, S.FAILED)
        self._adopt(grant, view)

    def _wait_for_token(self) -> None:
        st = self.tokens.status()
        state = S.NEEDS_SIGN_IN if st.state == S.NEEDS_SIGN_IN else (S.FAILED if st.state == S.FAILED else S.BACKOFF)
        with self._cond:
            self._failure = self.tokens._failure if state == S.FAILED else None
        if self._current() is None:
            self._set_status(state=state, last_error=st.last_error or "waiting for a Vault token")
        self._mint_at = self.clock.time() + self.tuning.sign_in_recheck  # a new token wakes us sooner

    def _mint_failed(self, exc: DbtunneldError, state: CredentialState) -> None:
        slow = state == S.FAILED
        delay = self.tuning.failed_recheck if slow else self.tuning.backoff.delay(self._mint_attempt, self.rng.random())
        self._mint_attempt += 1
        self.ulog.warning("minting credentials (role %s) failed (%s); retry %d in %.1f s",
                          self.cluster.db_role, short_error(exc), self._mint_attempt, delay)
        with self._cond:
            self._failure = exc if slow else None
        if self._current() is None:
            self._set_status(state=state, last_error=short_error(exc), next_action_at=self.clock.time() + delay)
        else:
            self._set_status(last_error=short_error(exc))
        self._mint_at = self.clock.time() + delay

    def _adopt(self, grant: LeaseGrant, view: TokenView) -> None:
        dlog.register_secret(grant.password)
        if self.stopping:  # released while minting: give it back at once
            revoke_leases([RevokeTarget(grant.lease_id, self.name, grant.username, grant.issued_at + grant.duration)],
                          self.tokens, self.store, time.monotonic() + 5, self._engine())
            return
        me = my_identity()
        self.store.add(LeaseRecord(grant.lease_id, self.name, grant.username, self.tokens.config.address,
                                   os.getpid(), grant.issued_at, me.started, me.command))
        lease = _Lease(grant, view.accessor, grant.issued_at + grant.duration, grant.duration, grant.renewable,
                       jittered_grace(grant.duration, self.rng.random()))
        with self._cond:
            old = self._current()
            if old is not None:
                old.retired = True
            self._leases.append(lease)
            self._failure = None
        self.mints += 1
        self._mint_attempt = 0
        self._plan(lease)
        if old is not None:
            self._plan(old)
        self.ulog.info("new user %s (lease %s, ttl %.0f s)", grant.username, grant.lease_id, grant.duration)
        self._set_status(state=S.VALID, identity=grant.username, expires_at=lease.expires_at, last_error="")
        if old is None:
            self._emit("db.minted", detail=f"user {grant.username}")
        else:
            self._emit("db.rotated", detail=f"new user {grant.username}; {old.grant.username} stays valid until it expires")

    def _rotate(self, lease: _Lease) -> None:
        """Mint a successor for ``lease`` (the current one), unless that cannot outlive it."""
        view = self.tokens.current()
        end = self._end(lease)
        if view is not None and view.accessor == lease.token_accessor:
            token_end = view.max_expires_at
            if token_end is None and not lease.probed:
                # A successor minted with a token about to end would end with it: find out first.
                lease.probed = True
                self.tokens.probe_soon()
                now = self.clock.time()
                lease.next_at = now + min(0.5, max(0.05, (lease.expires_at - now) / 4))
                return
            if token_end is not None and end is not None and token_end <= end + 1:
                # The only token we have dies with this lease: a successor minted with it would
                # die too. Keep renewing; the next token (``_follow_token``) brings the rotation.
                return self._renew_while_waiting(lease)
        self._mint_at = self.clock.time()
        before = len(self._leases)
        self._mint()
        if len(self._leases) == before:  # minting failed: keep renewing what we have
            lease.action, lease.next_at = "renew", min(self._mint_at, lease.expires_at - lease.grace)

    def _renew_while_waiting(self, lease: _Lease) -> None:
        now = self.clock.time()
        extendable = lease.renewable and (lease.max_known is None or lease.expires_at < lease.max_known - 1)
        at = now + (lease.expires_at - now) * 2 / 3
        if extendable and at < lease.expires_at - lease.grace:
            lease.action, lease.next_at = "renew", max(at, now + 0.5)
        else:
            lease.action, lease.next_at = "expire", lease.expires_at

    # -- renew

    def _renew(self, lease: _Lease) -> None:
        view = self.tokens.current()
        if view is None:
            return self._renew_failed(lease, TransientError("no valid Vault token to renew with"))
        self.vault.use_token(view.secret)
        try:
            renewal = self.vault.renew_lease(lease.lease_id, lease.increment)
        except TransientError as exc:
            return self._renew_failed(lease, exc)
        except PermissionDeniedError as exc:
            self.tokens.check_soon()
            return self._renew_failed(lease, exc)
        except VaultRequestError as exc:
            return self._lease_gone(lease, exc)
        now = self.clock.time()
        self.renewals += 1
        lease.expires_at, lease.renewable = now + renewal.duration, renewal.renewable
        if renewal_capped(lease.increment, renewal.duration) and lease.max_known is None:
            lease.max_known = now + renewal.duration
            self._learned_lifetime = lease.max_known - lease.grant.issued_at
            self.ulog.info("user %s reaches its max TTL in %.0f s", lease.grant.username, renewal.duration)
        if not lease.retired:
            self._set_status(state=S.VALID, expires_at=lease.expires_at, last_error="")
        self._plan(lease)

    def _renew_failed(self, lease: _Lease, exc: DbtunneldError) -> None:
        now = self.clock.time()
        delay = retry_within(self.tuning.backoff.delay(lease.attempt, self.rng.random()), now, lease.expires_at, lease.grace)
        if delay is None:
            self.ulog.warning("renewing user %s failed (%s); no retry fits before it expires", lease.grant.username,
                              short_error(exc))
            lease.action, lease.next_at = "expire", lease.expires_at
            if not lease.retired:
                lease.retired = True
                self._mint_at = now
            return
        lease.attempt += 1
        self.ulog.warning("renewing user %s failed (%s); retry %d in %.1f s", lease.grant.username, short_error(exc),
                          lease.attempt, delay)
        lease.action, lease.next_at = "renew", now + delay
        if not lease.retired:
            self._set_status(last_error=short_error(exc))

    def _lease_gone(self, lease: _Lease, exc: DbtunneldError) -> None:
        self.ulog.warning("lease of user %s is gone (%s)", lease.grant.username, short_error(exc))
        with self._cond:
            if lease in self._leases:
                self._leases.remove(lease)
        self.store.remove(lease.lease_id)
        if not lease.retired:
            self._mint_at = self.clock.time()

    # -- release

    def revoke_all(self, deadline: float) -> list[LeaseOutcome]:
        """Revoke every lease this keeper holds (by ``deadline``, monotonic); an outcome per lease."""
        outcomes = revoke_leases([self.target(lz) for lz in self.take_leases()], self.tokens, self.store, deadline,
                                 self._engine())
        self.settle(outcomes)
        return outcomes

    def target(self, lease: _Lease) -> RevokeTarget:
        """What revoking ``lease`` needs, with when its user ends on its own."""
        end = min(lease.expires_at, self.tokens.max_expiry(lease.token_accessor) or math.inf)
        return RevokeTarget(lease.lease_id, self.name, lease.grant.username, finite(end), lease.token_accessor)

    def settle(self, outcomes: list[LeaseOutcome]) -> None:
        """After revoking: the keeper's state, and an event per user revoked."""
        gone = all(o.revoked for o in outcomes)
        self._set_status(state=S.REVOKED if gone else S.IDLE, identity="", expires_at=None, next_action_at=None,
                         last_error="" if gone else "; ".join(sorted({o.reason for o in outcomes if not o.revoked})))
        for o in outcomes:
            if o.revoked:
                self._emit("db.revoked", detail=f"user {o.username}")
