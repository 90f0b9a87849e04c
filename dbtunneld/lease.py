"""Credentials engine: AWS identity -> Vault token kept alive -> leased DB users per cluster.

Facade for the supervisor / daemon (everything else here is internal)::

    engine = CredentialEngine(config, paths, keystore, clock=SYSTEM_CLOCK, on_event=callback)
    engine.start()                      # resume the token from the keyring (lookup-self) or log in;
                                        # revoke the leases a crashed run left behind
    creds = engine.want("orders", timeout=30)   # DbCredentials; blocks until minted, or raises
                                        # SignInNeededError / PermissionDeniedError / TransientError ...
    engine.current("orders")            # newest DbCredentials or None, never blocks
    engine.renew_now("orders")          # renew the lease now (rotate=True: mint new credentials)
    engine.release("orders")            # revoke the cluster's leases (bounded); it goes idle
    aws, vault, dbs = engine.status()   # model.CredentialStatus snapshots ({cluster: status})
    info = engine.sso_login(open_browser=webbrowser.open)   # starts the SSO sign-in: authorization
                                        # code with PKCE (use_device_code=True: device flow); returns
                                        # {flow, verification_uri[_complete], user_code, expires_at};
                                        # completion is announced by an "sso.signed_in" event
    engine.aws.boto3()                  # the boto3 session (SSM, EC2, RDS) on the same identity
    engine.stop(revoke=True, timeout=10)  # stop the keepers, revoke leases within the bound

Events: ``on_event(CredentialEvent)`` is called from keeper threads (keep it quick; exceptions
are logged, never raised into the engine). Kinds: ``status`` (a credential changed state: one
event per change, so "sign-in needed" is announced once), ``vault.login``, ``db.minted``,
``db.rotated`` (new credentials replaced the current ones; the old user stays valid until it
expires), ``db.revoked``, ``db.expired``, ``sso.started``, ``sso.signed_in``, ``sso.failed``.
Events never carry secrets: read the password with ``current()``.

Keepers, each with its one retry loop (``keeper.Keeper``; ``run_once`` returns the delay to its
next step, so tests drive them in virtual time):

* ``sso_keeper.SsoKeeper`` refreshes the SSO token before it expires and decides "sign in needed"
  from the refresh outcome (not from the hourly access-token expiry).
* ``token_keeper.TokenKeeper`` keeps one Vault token: resume from the keyring, log in with the AWS
  identity, renew at ~2/3 of its TTL (``timing.plan_next``), back off on failure bounded by its
  remaining life, log in again before its max TTL (learned from a capped renewal, then predicted).
* ``LeaseKeeper`` per wanted cluster: mint ``database/creds/<role>``, renew, mint a successor
  ``credentials.mint_ahead`` (clamped to a third of the lifetime) before the lease's end (its
  max TTL, or the end of the token that minted it: Vault revokes a token's leases with it),
  keep the old lease renewed until it expires, revoke everything on release.
* ``LeaseStore``: lease ids and user names (never passwords) in ``paths.leases_file`` (0600),
  so the next start revokes what a crashed run left behind.

Passwords live in memory only; the Vault token also in the keyring (``keystore``).
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import threading
import time
from dataclasses import MISSING, asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any, Callable

from . import log as dlog
from .aws import AwsSession, parse_utc
from .config import ClusterConfig, Config, VaultConfig
from .errors import ClosedError, DbtunneldError, PermissionDeniedError, TransientError
from .keeper import CredentialEvent, Keeper, Tuning, finite, short_error
from .keystore import Keystore
from .model import CredentialState, CredentialStatus, DbCredentials, LeaseOutcome
from .paths import Paths, ProcessIdentity, my_identity, pid_alive
from .revoke import RevokeTarget, revoke_leases, revoke_with_token
from .timing import SYSTEM_CLOCK, Clock, Lifetime, jittered_grace, plan_next, renewal_capped, replace_time, retry_within
from .sso import refresh_blocker
from .sso_keeper import SsoKeeper
from .sso_signin import SsoSignIn
from .token_keeper import TokenKeeper, TokenView
from .vault import LeaseGrant, VaultClient, VaultRequestError

__all__ = ["CredentialEngine", "CredentialEvent", "DbCredentials", "LeaseKeeper", "LeaseRecord", "LeaseStore",
           "TokenKeeper", "Tuning", "orphans", "revoke_leases"]

log = logging.getLogger(__name__)

S = CredentialState


# ---------------------------------------------------------------------------------------------
# Public value types


# ---------------------------------------------------------------------------------------------
# Persisted lease records


@dataclass(frozen=True)
class LeaseRecord:
    """What survives a crash: enough to revoke, nothing to log in with."""

    lease_id: str
    cluster: str
    username: str
    vault: str
    pid: int
    issued_at: float
    owner_started: str = ""       # identity of the process ``pid`` (``paths.ProcessIdentity``): a
    owner_command: str = ""       # zombie or a reused pid is not the owner (empty in older files)

    def owner_alive(self) -> bool:
        """The process that holds this lease still runs (not a zombie, not another program)."""
        recorded = ProcessIdentity(self.owner_started, self.owner_command) if self.owner_started else None
        return pid_alive(self.pid, recorded)


class LeaseStore:
    """``leases.json`` (0600, replaced atomically): the leases this and earlier runs hold."""

    VERSION = 1

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._records: dict[str, LeaseRecord] = {r.lease_id: r for r in self._read()}

    def _read(self) -> list[LeaseRecord]:
        try:
            doc = json.loads(self.path.read_text())
        except FileNotFoundError:
            return []
        except (OSError, ValueError) as exc:
            log.warning("ignoring unreadable %s (%s); leases it named expire on their own", self.path, exc)
            return []
        names = set(LeaseRecord.__dataclass_fields__)
        required = {f.name for f in fields(LeaseRecord) if f.default is MISSING}
        return [LeaseRecord(**{k: v for k, v in r.items() if k in names})
                for r in doc.get("leases", []) if isinstance(r, dict) and required <= set(r)]

    def records(self) -> list[LeaseRecord]:
        with self._lock:
            return list(self._records.values())

    def add(self, record: LeaseRecord) -> None:
        with self._lock:
            self._records[record.lease_id] = record
            self._write()

    def remove(self, lease_id: str) -> None:
        with self._lock:
            if self._records.pop(lease_id, None) is not None:
                self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"version": self.VERSION, "leases": [asdict(r) for r in self._records.values()]}, f, indent=1)
        os.replace(tmp, self.path)



def orphans(records: list[LeaseRecord], me: int | None = None) -> list[LeaseRecord]:
    """Records no running process owns (a live other owner is another instance: leave it alone).
    A zombie owner (killed, not reaped yet) or a pid now used by another program owns nothing."""
    me = os.getpid() if me is None else me
    return [r for r in records if r.pid == me or not r.owner_alive()]


# ---------------------------------------------------------------------------------------------
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
                 emit: Callable[[CredentialEvent], None], tuning: Tuning, mint_ahead: float, rng: random.Random) -> None:
        super().__init__(cluster.name, clock, emit)
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
        self._renew_requests = 0
        self._renew_done = 0
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
            return self.tokens._raise_if_blocked()   # waiting for a token: its problem is ours
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
        with self._cond:
            now = self.clock.time()
            lease = self._current()
            if lease is None or rotate:
                self._mint_at = now
                if lease is not None:  # asked for: mint now, without probing the token first
                    lease.action, lease.next_at, lease.probed = "rotate", now, True
            else:
                lease.action, lease.next_at, lease.attempt = "renew", now, 0
            self._renew_requests += 1
            ticket = self._renew_requests
        self.wake()
        return ticket

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
        if self._current() is None and now >= self._mint_at:
            self._mint()
        for lease in list(self._leases):
            if lease.next_at <= self.clock.time() and lease in self._leases:
                self._act(lease)
        self._finish_renewal_requests()
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

    def _finish_renewal_requests(self) -> None:
        with self._cond:
            if self._renew_done != self._renew_requests:
                self._renew_done = self._renew_requests
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
                          self.tokens, self.store, time.monotonic() + 5)
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
        outcomes = revoke_leases([self.target(lz) for lz in self.take_leases()], self.tokens, self.store, deadline)
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


# ---------------------------------------------------------------------------------------------
# The facade


class CredentialEngine:
    """AWS identity -> Vault token -> DB users; see the module docstring for the API."""

    def __init__(self, config: Config, paths: Paths, keystore: Keystore, *, clock: Clock = SYSTEM_CLOCK,
                 on_event: Callable[[CredentialEvent], None] | None = None, tuning: Tuning = Tuning(),
                 aws: AwsSession | None = None, make_vault: Callable[[VaultConfig], VaultClient] | None = None,
                 rng: random.Random | None = None, threaded: bool = True) -> None:
        self.config = config
        self.paths = paths
        self.keystore = keystore
        self.clock = clock
        self.tuning = tuning
        self.threaded = threaded
        self._on_event = on_event or (lambda event: None)
        self._rng = rng or random.Random()
        self._make_vault = make_vault or (lambda cfg: VaultClient(cfg, clock=clock))
        self.aws = aws or AwsSession(config.aws, clock=clock)
        self.store = LeaseStore(paths.leases_file)
        self._lock = threading.RLock()
        self._aws_status = CredentialStatus(kind="aws", name=self.aws.profile, state=S.IDLE, since=clock.time())
        self.tokens = TokenKeeper(config.vault, self.aws, keystore, self._make_vault, clock=clock, emit=self._emit,
                                  tuning=tuning, mint_ahead=config.credentials.mint_ahead, rng=self._rng,
                                  on_token_change=self._token_changed, on_aws_status=self._set_aws_status)
        self.keepers: dict[str, LeaseKeeper] = {}
        self._orphans = self._find_orphans()
        self._sweeper: threading.Thread | None = None
        self._stopping = threading.Event()
        self.sso = SsoKeeper(self.aws, clock=clock, emit=self._emit, tuning=tuning, rng=self._rng,
                             on_result=self._sso_checked)
        self._sso_signin = SsoSignIn(self.aws, clock=clock, tuning=tuning, stopping=self._stopping,
                                     on_done=self._sso_done)
        self._started = False
        self._identity_tried = False

    def _find_orphans(self) -> list[LeaseRecord]:
        """Leases an earlier run left behind in this Vault (others cannot be revoked from here)."""
        found = []
        for record in orphans(self.store.records()):
            if record.vault == self.config.vault.address:
                found.append(record)
            else:
                log.info("forgetting lease %s of another Vault (%s); it expires on its own",
                         record.lease_id, record.vault)
                self.store.remove(record.lease_id)
        return found

    # -- events

    def _emit(self, event: CredentialEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("event handler failed on %s %s", event.kind, event.name)

    def _token_changed(self) -> None:
        for keeper in list(self.keepers.values()):
            keeper.wake()
        if self._orphans and self._sweeper is None and self.threaded and not self._stopping.is_set():
            self._sweeper = threading.Thread(target=self._sweep_orphans, name="dbtunneld-orphans", daemon=True)
            self._sweeper.start()

    def _set_aws_status(self, state: CredentialState, error: str, identity: str) -> None:
        if state == S.VALID and not identity and not self._aws_status.identity and not self._identity_tried:
            self._identity_tried = True
            try:
                identity = self.aws.caller_arn()
            except DbtunneldError as exc:
                log.info("sts:GetCallerIdentity failed (%s); the AWS identity stays unknown", short_error(exc))
        with self._lock:
            old = self._aws_status
            changes: dict[str, Any] = {"state": state, "last_error": error}
            if identity:
                changes["identity"] = identity
            if state != old.state:
                changes["since"] = self.clock.time()
            self._aws_status = replace(old, **changes)
            new = self._aws_status
        if new.state != old.state:
            self._emit(CredentialEvent("status", new.name, self.clock.time(), new))

    # -- lifecycle

    def start(self) -> None:
        """Start keeping the Vault token (resume or log in); orphans are revoked once it is valid."""
        if self._started:
            return
        self._started = True
        if self._orphans:
            log.info("found %d lease(s) left by an earlier run; revoking them once Vault is reachable",
                     len(self._orphans))
        self.sso.start(self.threaded)
        self.tokens.start(self.threaded)

    def stop(self, revoke: bool = True, timeout: float | None = None) -> list[LeaseOutcome]:
        """Stop every keeper; with ``revoke`` revoke all leases, bounded by ``timeout``
        (default ``credentials.revoke_timeout``) even when Vault or the network are failing.
        Leases not revoked in time stay in the leases file: the next start revokes them.
        Returns an outcome per lease (empty when already stopped). Idempotent."""
        bound = self.config.credentials.revoke_timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        with self._lock:
            if self._stopping.is_set():
                return []
            self._stopping.set()
            keepers = list(self.keepers.values())
        self._stop_units(keepers, deadline)
        outcomes = self._revoke_everything(keepers, deadline, bound) if revoke else []
        self._sso_signin.join(max(0.0, deadline - time.monotonic()))
        if self._sweeper is not None:
            self._sweeper.join(max(0.0, deadline - time.monotonic()))
        for unit in keepers + [self.tokens]:
            unit.vault.close()
        return outcomes

    def _stop_units(self, keepers: list[LeaseKeeper], deadline: float) -> None:
        units = keepers + [self.tokens, self.sso]
        for unit in units:          # all at once, then wait: a hung unit does not delay the others
            unit._stopping.set()
            unit.wake()
        for unit in units:
            unit.stop(timeout=max(0.0, min(2.0, deadline - time.monotonic())))

    def _revoke_everything(self, keepers: list[LeaseKeeper], deadline: float, bound: float) -> list[LeaseOutcome]:
        """Revoke every lease; those the policy or the network kept from being revoked one by one
        go with the token when this token minted them (``revoke.revoke_with_token``)."""
        targets = {k: [k.target(lz) for lz in k.take_leases()] for k in keepers}
        flat = [t for ts in targets.values() for t in ts]
        outcomes = revoke_leases(flat, self.tokens, self.store, deadline)
        outcomes = revoke_with_token(outcomes, {t.lease_id: t.token_accessor for t in flat}, self.tokens,
                                     self.store, deadline)
        by_id = {o.lease_id: o for o in outcomes}
        for keeper, ts in targets.items():
            keeper.settle([by_id[t.lease_id] for t in ts])
        late = [o for o in outcomes if not o.revoked and o.retried]
        if late:
            log.warning("%d lease(s) not revoked within %.1f s; the next start revokes them", len(late), bound)
        if not self.keystore.persistent and self.tokens.current() is not None and time.monotonic() < deadline:
            self.tokens.revoke(deadline - time.monotonic())   # it cannot be resumed after a restart anyway
        return outcomes

    # -- clusters

    def request(self, cluster_name: str) -> LeaseKeeper:
        """Want credentials for a cluster without waiting (``want`` waits)."""
        cluster = self.config.cluster(cluster_name)
        with self._lock:
            if self._stopping.is_set():
                raise ClosedError("the credential engine is stopped")
            keeper = self.keepers.get(cluster_name)
            if keeper is None:
                keeper = LeaseKeeper(cluster, self.tokens, self.store, self._make_vault, clock=self.clock,
                                     emit=self._emit, tuning=self.tuning, mint_ahead=self.config.credentials.mint_ahead,
                                     rng=self._rng)
                self.keepers[cluster_name] = keeper
                keeper.start(self.threaded)
        return keeper

    def want(self, cluster_name: str, timeout: float = 30.0) -> DbCredentials:
        """Credentials for ``cluster_name``: minted on first call, then kept; waits up to ``timeout``."""
        keeper = self.request(cluster_name)
        if self.tokens.current() is None and keeper.current() is None:
            self.tokens._raise_if_blocked()
        return keeper.wait_credentials(timeout)

    def current(self, cluster_name: str) -> DbCredentials | None:
        keeper = self.keepers.get(cluster_name)
        return keeper.current() if keeper else None

    def renew_now(self, cluster_name: str, *, rotate: bool = False, timeout: float = 10.0) -> DbCredentials:
        """Renew the cluster's lease now (``rotate``: mint new credentials); returns the current ones."""
        keeper = self.request(cluster_name)
        ticket = keeper.request_renewal(rotate)
        if self.threaded:
            keeper.wait_renewal(ticket, timeout)
        return keeper.wait_credentials(timeout if self.threaded else 0)

    def release(self, cluster_name: str, timeout: float | None = None) -> list[LeaseOutcome]:
        """Stop keeping the cluster's credentials and revoke them (bounded); an outcome per lease.
        No token fallback here: revoking the token would end the other clusters' users too."""
        with self._lock:
            keeper = self.keepers.pop(cluster_name, None)
        if keeper is None:
            return []
        bound = self.config.credentials.revoke_timeout if timeout is None else timeout
        deadline = time.monotonic() + bound
        keeper.stop(timeout=min(2.0, bound))
        outcomes = keeper.revoke_all(deadline)
        keeper.vault.close()
        return outcomes

    # -- status

    def status(self) -> tuple[CredentialStatus, CredentialStatus, dict[str, CredentialStatus]]:
        return self.aws_status(), self.tokens.status(), {n: k.status() for n, k in list(self.keepers.items())}

    def aws_status(self) -> CredentialStatus:
        """The AWS sign-in as the keepers last found it. A token that can be refreshed has no
        known end (the SSO session's length is not told to clients): ``expires_at`` is then None;
        one that cannot shows its expiry and reads "sign in" once past it."""
        with self._lock:
            st = self._aws_status
        try:
            sso = self.aws.sso_settings()
            entry = self.aws.cached_sso_token() if sso else None
        except DbtunneldError:
            sso, entry = None, None
        if sso is None or not entry:
            return st
        now = self.clock.time()
        expires = parse_utc(str(entry.get("expiresAt", "")))
        if expires is not None and expires <= now:
            self.sso.notice_expired(expires)
        if not refresh_blocker(entry, sso, now):
            return replace(st, expires_at=None)
        st = replace(st, expires_at=expires)
        if st.state == S.VALID and expires is not None and expires <= now:
            st = replace(st, state=S.NEEDS_SIGN_IN, last_error="the AWS SSO sign-in expired and cannot be refreshed")
        return st

    # -- orphans

    def _sweep_orphans(self) -> None:
        """Revoke leases an earlier run left behind: at most ``tuning.orphan_tries`` attempts within
        ``tuning.orphan_window`` seconds; a lease the policy does not let us revoke is not retried.
        What is left stays in the leases file for the next start."""
        started, attempt = self.clock.time(), 0
        while self._orphans and not self._stopping.is_set():
            self.sweep_orphans_once()
            attempt += 1
            if not self._orphans:
                return
            delay = self.tuning.backoff.delay(attempt - 1, self._rng.random())
            if attempt >= self.tuning.orphan_tries or self.clock.time() + delay - started > self.tuning.orphan_window:
                log.warning("giving up on %d orphaned lease(s) after %d tries in %.0f s; the next start tries again",
                            len(self._orphans), attempt, self.clock.time() - started)
                return
            log.warning("%d orphaned lease(s) not revoked yet; retry %d in %.1f s", len(self._orphans), attempt, delay)
            self.clock.wait(self._stopping, delay)

    def sweep_orphans_once(self) -> list[LeaseOutcome]:
        """One attempt at the orphans (also for callers that run the engine without threads);
        returns the outcomes. Retried ones stay orphans; revoked and denied ones are done."""
        records = list(self._orphans)
        targets = [RevokeTarget(r.lease_id, r.cluster, r.username) for r in records]
        outcomes = revoke_leases(targets, self.tokens, self.store,
                                 time.monotonic() + self.config.credentials.revoke_timeout)
        retry = {o.lease_id for o in outcomes if o.retried}
        self._orphans = [r for r in records if r.lease_id in retry]
        return outcomes

    # -- SSO sign-in

    def sso_login(self, open_browser: Callable[[str], Any] | None = None, *,
                  use_device_code: bool = False) -> dict[str, Any]:
        """Start the SSO sign-in (returns what to show the user); it completes in the background."""
        info, new = self._sso_signin.start(use_device_code)
        url = info["verification_uri_complete"]
        if new:
            shown = f"{url} code {info['user_code']}" if info.get("user_code") else url
            log.info("SSO sign-in started (%s): open %s", info.get("flow"), shown)
            self._emit(CredentialEvent("sso.started", self.aws.profile, self.clock.time(), self.aws_status(), shown))
        if open_browser is not None:
            try:
                open_browser(url)
            except Exception as exc:
                log.warning("could not open a browser (%s); open %s yourself", exc, url)
        return info

    def _sso_done(self, ok: bool, detail: str) -> None:
        if not ok:
            self._emit(CredentialEvent("sso.failed", self.aws.profile, self.clock.time(), self.aws_status(), detail))
            return
        self._signed_in()

    def _sso_checked(self, state: CredentialState, error: str) -> None:
        """The SSO keeper's verdict (refresh outcome); a sign-in made elsewhere is picked up."""
        with self._lock:
            was = self._aws_status.state
        self._set_aws_status(state, error, "")
        if state == S.VALID and was == S.NEEDS_SIGN_IN:
            self.aws.reset()
            self._wake_after_sign_in()

    def _signed_in(self) -> None:
        self.aws.reset()
        identity = ""
        try:
            identity = self.aws.caller_arn()
        except DbtunneldError as exc:
            log.info("signed in, but sts:GetCallerIdentity failed (%s)", short_error(exc))
        self._set_aws_status(S.VALID, "", identity)
        log.info("AWS SSO sign-in completed for profile %s", self.aws.profile)
        self.sso.check_soon()
        self._wake_after_sign_in()
        self._emit(CredentialEvent("sso.signed_in", self.aws.profile, self.clock.time(), self.aws_status()))

    def _wake_after_sign_in(self) -> None:
        self.tokens.notify_signed_in()
        for keeper in list(self.keepers.values()):
            keeper._mint_at = self.clock.time()
            keeper.wake()
