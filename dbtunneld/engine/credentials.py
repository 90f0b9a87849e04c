"""The credential engine (facade): AWS identity -> AWS identity -> Vault token kept alive -> leased DB users per cluster.

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

Events: ``on_event(CredentialEvent)`` is called from the worker running a keeper's step (keep it quick; exceptions
are logged, never raised into the engine). Kinds: ``status`` (a credential changed state: one
event per change, so "sign-in needed" is announced once), ``vault.login``, ``db.minted``,
``db.rotated`` (new credentials replaced the current ones; the old user stays valid until it
expires), ``db.revoked``, ``db.expired``, ``sso.started``, ``sso.signed_in``, ``sso.failed``.
Events never carry secrets: read the password with ``current()``.

Keepers, each a unit of one ``scheduler.Scheduler`` (``keeper.Keeper``; ``run_once`` returns the
delay to its next step). The engine runs on an ``engine_loop.EngineLoop`` and a scheduler: the
supervisor's (``attach``), or its own (``threaded=True``: it drives it on its own loop;
``threaded=False``: nobody does, a test drives ``engine.scheduler`` in virtual time with
``tests/helpers/fakevault.run_virtual``, and orphans are swept by ``sweep_orphans_once`` only):

* ``sso_keeper.SsoKeeper`` refreshes the SSO token before it expires and decides "sign in needed"
  from the refresh outcome (not from the hourly access-token expiry).
* ``token_keeper.TokenKeeper`` keeps one Vault token: resume from the keyring, log in with the AWS
  identity, renew at ~2/3 of its TTL (``timing.plan_next``), back off on failure bounded by its
  remaining life, log in again before its max TTL (learned from a capped renewal, then predicted).
* ``lease_keeper.LeaseKeeper`` per wanted cluster: mint ``database/creds/<role>``, renew, mint a successor
  ``credentials.mint_ahead`` (clamped to a third of the lifetime) before the lease's end (its
  max TTL, or the end of the token that minted it: Vault revokes a token's leases with it),
  keep the old lease renewed until it expires, revoke everything on release.
* ``lease_store.LeaseStore``: lease ids and user names (never passwords) in ``paths.leases_file`` (0600),
  so the next start revokes what a crashed run left behind.

``orphans.OrphanSweeper`` revokes what a crashed run left behind once the token is valid.
Passwords live in memory only; the Vault token also in the keyring (``keystore``).
"""

from __future__ import annotations

import concurrent.futures
import logging
import random
import threading
import time
from dataclasses import replace
from typing import Any, Callable

from ..adapters.aws import AwsSession, parse_utc
from ..adapters.keystore import Keystore
from ..adapters.sso import refresh_blocker
from ..adapters.vault import VaultClient
from ..core.config import Config, VaultConfig
from ..core.errors import ClosedError, DbtunneldError
from ..core.model import CredentialState, CredentialStatus, DbCredentials, LeaseOutcome
from ..core.paths import Paths
from ..core.timing import SYSTEM_CLOCK, Clock
from .engine_loop import EngineLoop
from .keeper import CredentialEvent, Tuning, short_error
from .lease_keeper import LeaseKeeper
from .lease_store import LeaseStore
from .orphans import OrphanSweeper
from .revoke import revoke_leases, revoke_with_token
from .scheduler import Scheduler
from .sso_keeper import SsoKeeper
from .sso_signin import SsoSignIn
from .token_keeper import TokenKeeper

log = logging.getLogger(__name__)

S = CredentialState


class CredentialEngine:
    """AWS identity -> Vault token -> DB users; see the module docstring for the API."""

    def __init__(self, config: Config, paths: Paths, keystore: Keystore, *, clock: Clock = SYSTEM_CLOCK,
                 on_event: Callable[[CredentialEvent], None] | None = None, tuning: Tuning = Tuning(),
                 aws: AwsSession | None = None, make_vault: Callable[[VaultConfig], VaultClient] | None = None,
                 rng: random.Random | None = None, threaded: bool = True, engine_loop: EngineLoop | None = None,
                 scheduler: Scheduler | None = None) -> None:
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
        self._engine_loop, self._owns_loop = engine_loop, False
        self.scheduler = scheduler or Scheduler(clock)
        self._drives = scheduler is None     # our own schedule: we drive it (threaded) or the test does
        self._driver: concurrent.futures.Future[None] | None = None
        self._aws_status = CredentialStatus(kind="aws", name=self.aws.profile, state=S.IDLE, since=clock.time())
        self.tokens = TokenKeeper(config.vault, self.aws, keystore, self._make_vault, clock=clock, emit=self._emit,
                                  tuning=tuning, mint_ahead=config.credentials.mint_ahead, rng=self._rng,
                                  on_token_change=self._token_changed, on_aws_status=self._set_aws_status)
        self.keepers: dict[str, LeaseKeeper] = {}
        self._stopping = threading.Event()
        self.orphans = OrphanSweeper(self.store, config.vault.address, self.tokens, clock=clock, tuning=tuning,
                                     rng=self._rng, revoke_timeout=config.credentials.revoke_timeout,
                                     stopping=self._stopping, engine=lambda: self.engine_loop)
        self.sso = SsoKeeper(self.aws, clock=clock, emit=self._emit, tuning=tuning, rng=self._rng,
                             on_result=self._sso_checked)
        self._sso_signin = SsoSignIn(self.aws, clock=clock, tuning=tuning, stopping=self._stopping,
                                     on_done=self._sso_done, engine=lambda: self.engine_loop)
        self._started = False
        self._identity_tried = False

    # -- events

    def _emit(self, event: CredentialEvent) -> None:
        try:
            self._on_event(event)
        except Exception:
            log.exception("event handler failed on %s %s", event.kind, event.name)

    def _token_changed(self) -> None:
        for keeper in list(self.keepers.values()):
            keeper.wake()
        if self.threaded:
            self.orphans.start_once(self.scheduler)

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

    def attach(self, engine_loop: EngineLoop, scheduler: Scheduler) -> None:
        """Run on a shared engine loop and schedule (the supervisor's, which drives it); before ``start``."""
        if self._started:
            raise RuntimeError("attach() after start()")
        self._engine_loop, self._owns_loop = engine_loop, False
        self.scheduler, self._drives = scheduler, False

    @property
    def engine_loop(self) -> EngineLoop:
        """The loop whose worker pool runs blocking calls with deadlines (parallel revokes, the SSO
        sign-in); an engine used on its own starts its own."""
        with self._lock:
            if self._engine_loop is None:
                self._engine_loop, self._owns_loop = EngineLoop(name="dbtunneld-credentials").start(), True
            return self._engine_loop

    def start(self) -> None:
        """Start keeping the Vault token (resume or log in); orphans are revoked once it is valid."""
        if self._started:
            return
        self._started = True
        if self.orphans.pending:
            log.info("found %d lease(s) left by an earlier run; revoking them once Vault is reachable",
                     len(self.orphans.pending))
        if self.threaded and self._drives:
            loop = self.engine_loop
            self._driver = loop.submit(self.scheduler.drive(loop))
        self.sso.start(self.scheduler)
        self.tokens.start(self.scheduler)

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
        self.orphans.stop()
        self._stop_units(keepers, deadline)
        outcomes = self._revoke_everything(keepers, deadline, bound) if revoke else []
        self._sso_signin.join(max(0.0, deadline - time.monotonic()))
        for unit in keepers + [self.tokens]:
            unit.vault.close()
        self._stop_loop(deadline)
        return outcomes

    def _stop_loop(self, deadline: float) -> None:
        """End the driver of our own schedule and the loop we started (not a shared one)."""
        if self._driver is not None:
            self._driver.cancel()
        with self._lock:
            loop, owned = self._engine_loop, self._owns_loop
        if loop is not None and owned:
            loop.stop(timeout=max(0.1, min(1.0, deadline - time.monotonic())))

    def _stop_units(self, keepers: list[LeaseKeeper], deadline: float) -> None:
        units = keepers + [self.tokens, self.sso]
        for unit in units:          # all at once, then wait: a hung unit does not delay the others
            unit.request_stop()
        for unit in units:
            unit.stop(timeout=max(0.0, min(2.0, deadline - time.monotonic())))

    def _revoke_everything(self, keepers: list[LeaseKeeper], deadline: float, bound: float) -> list[LeaseOutcome]:
        """Revoke every lease; those the policy or the network kept from being revoked one by one
        go with the token when this token minted them (``revoke.revoke_with_token``)."""
        targets = {k: [k.target(lz) for lz in k.take_leases()] for k in keepers}
        flat = [t for ts in targets.values() for t in ts]
        outcomes = revoke_leases(flat, self.tokens, self.store, deadline, self.engine_loop)
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
                                     rng=self._rng, engine=lambda: self.engine_loop)
                self.keepers[cluster_name] = keeper
                keeper.start(self.scheduler)
        return keeper

    def want(self, cluster_name: str, timeout: float = 30.0) -> DbCredentials:
        """Credentials for ``cluster_name``: minted on first call, then kept; waits up to ``timeout``."""
        keeper = self.request(cluster_name)
        if self.tokens.current() is None and keeper.current() is None:
            self.tokens.raise_if_blocked()
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

    def sweep_orphans_once(self) -> list[LeaseOutcome]:
        """One attempt at the leases an earlier run left behind (see ``orphans.OrphanSweeper``)."""
        return self.orphans.sweep_once()

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
            keeper.mint_soon()
