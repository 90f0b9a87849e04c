"""The Vault token keeper: one token, kept alive for the whole engine.

``TokenKeeper`` resumes the token stored in the keyring (checked with lookup-self) or logs in
with the AWS identity (aws auth, signed sts:GetCallerIdentity); renews it at ~2/3 of its TTL plus
a jittered grace (``timing.plan_next``); backs off on failure, bounded by the token's remaining
life; and logs in again before the max TTL, which it learns from the first capped renewal and
then predicts for later tokens. Lease keepers read it through ``current()`` / ``max_expiry()``
and ask for checks (``check_soon``, ``probe_soon``); it never touches their leases.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field, replace
from typing import Callable

from ..adapters import log as dlog
from ..adapters.aws import AwsSession
from ..adapters.keystore import Keystore
from ..adapters.vault import Token, TokenInfo, VaultClient
from ..core.config import VaultConfig
from ..core.errors import DbtunneldError, NeedsUserError, SignInNeededError, TransientError
from ..core.model import CredentialState
from ..core.timing import Clock, Lifetime, jittered_grace, plan_next, renewal_capped, retry_within
from .keeper import CredentialEvent, Keeper, Tuning, finite, short_error

log = logging.getLogger(__name__)

TOKEN_KIND = "vault-token"
S = CredentialState


@dataclass(frozen=True)
class TokenView:
    """The current token as lease keepers use it."""

    secret: str = field(repr=False)
    accessor: str = ""
    expires_at: float = math.inf
    max_expires_at: float | None = None


class TokenKeeper(Keeper):
    """Keeps one Vault token alive: resume, log in, renew, log in again before the max TTL."""

    kind = "vault"

    def __init__(self, vault_config: VaultConfig, aws: AwsSession, keystore: Keystore, make_vault: Callable[[VaultConfig], VaultClient],
                 *, clock: Clock, emit: Callable[[CredentialEvent], None], tuning: Tuning, mint_ahead: float,
                 rng: random.Random, on_token_change: Callable[[], None] = lambda: None,
                 on_aws_status: Callable[[CredentialState, str, str], None] = lambda *a: None) -> None:
        super().__init__(vault_config.address, clock, emit)
        self.config = vault_config
        self.aws = aws
        self.keystore = keystore
        self.make_vault = make_vault
        self.vault = make_vault(vault_config)
        self.tuning = tuning
        self.relogin_ahead = tuning.relogin_ahead if tuning.relogin_ahead is not None else 1.5 * mint_ahead
        self.rng = rng
        self.on_token_change = on_token_change
        self.on_aws_status = on_aws_status
        self.ulog = dlog.unit_logger(log, vault=vault_config.address)
        self.key_name = f"{vault_config.address}#{vault_config.auth_mount}/{vault_config.role}"
        self._token: Token | None = None
        self._expires_at = 0.0
        self._issued_at = 0.0
        self._renewable = False
        self._increment = 0.0
        self._max_known: dict[str, float] = {}      # accessor -> max expiry (learned)
        self._issued: dict[str, float] = {}         # accessor -> issue time
        self._learned_lifetime: float | None = None  # max TTL of this auth role, once seen
        self._grace = 0.0
        self._action, self._next_at, self._attempt = "resume", clock.time(), 0
        self.generation = 0   # bumped when the token is replaced or its max TTL becomes known
        self._blocked_msg = ""
        self._failure: DbtunneldError | None = None    # what blocks logging in (for callers)
        self.logins = 0
        self.renewals = 0
        self.failures = 0

    # -- what others read

    def current(self) -> TokenView | None:
        with self._cond:
            tok = self._token
            if tok is None or self.clock.time() >= self._expires_at:
                return None
            return TokenView(tok.secret, tok.info.accessor, self._expires_at, self._max_for(tok.info.accessor))

    def max_expiry(self, accessor: str) -> float | None:
        with self._cond:
            return self._max_for(accessor)

    def _max_for(self, accessor: str) -> float | None:
        if accessor in self._max_known:
            return self._max_known[accessor]
        if self._learned_lifetime is not None and accessor in self._issued:
            return self._issued[accessor] + self._learned_lifetime
        return None

    def raise_if_blocked(self) -> None:
        """Raise what keeps a token from being had (sign-in needed, a failure the user must fix)."""
        st = self._status
        if st.state == S.NEEDS_SIGN_IN:
            raise SignInNeededError(st.last_error or "AWS SSO sign-in needed")
        if st.state == S.FAILED:
            raise self._failure or NeedsUserError(st.last_error)

    def notify_signed_in(self) -> None:
        """The SSO sign-in completed: log in now if we were waiting for it."""
        with self._cond:
            if self._status.state in (S.NEEDS_SIGN_IN, S.FAILED, S.BACKOFF) or self._token is None:
                self._action, self._next_at, self._attempt = "login", self.clock.time(), 0
                self._failure, self._blocked_msg = None, ""
        if self.current() is None and self._status.state in (S.NEEDS_SIGN_IN, S.FAILED):
            self._set_status(state=S.ACQUIRING, last_error="")   # waiters now wait for the login
        self.wake()

    def probe_soon(self) -> None:
        """A lease keeper needs to know when this token ends: renew it now (a capped renewal says)."""
        with self._cond:
            if self._token is not None and self._action == "renew" and self._attempt == 0:
                self._next_at = min(self._next_at, self.clock.time())
        self.wake()

    def check_soon(self) -> None:
        """A lease keeper saw 403: verify the token with lookup-self now."""
        with self._cond:
            if self._token is not None:
                self._action, self._next_at = "verify", self.clock.time()
        self.wake()

    # -- the loop

    def run_once(self) -> float:
        now = self.clock.time()
        if now < self._next_at:
            return self._next_at - now
        self.steps += 1
        step = {"resume": self._resume, "login": self._login, "renew": self._renew,
                "verify": self._verify, "hold": self._hold}[self._action]
        step()
        return max(0.0, self._next_at - self.clock.time())

    def _hold(self) -> None:
        self._next_at = math.inf

    def _schedule(self, action: str, at: float) -> None:
        self._action, self._next_at = action, at
        self._set_status(next_action_at=None if math.isinf(at) else at)

    def _plan(self) -> None:
        """Next renewal or re-login for the token we hold (``timing.plan_next``)."""
        tok = self._token
        now = self.clock.time()
        life = Lifetime(self._issued_at, self._expires_at, self._increment, self._renewable,
                        self._max_for(tok.info.accessor) if tok else None)
        plan = plan_next(now, life, self._grace, self.relogin_ahead)
        self._attempt = 0
        self._schedule({"renew": "renew", "replace": "login", "hold": "hold"}[plan.action], plan.at)

    def _resume(self) -> None:
        self._acquiring()
        secret = self.keystore.get(TOKEN_KIND, self.key_name)
        if not secret:
            return self._login()
        dlog.register_secret(secret)
        self.vault.use_token(secret)
        try:
            info = self.vault.lookup_self()
        except TransientError as exc:
            return self._retry("resume", exc)
        except DbtunneldError as exc:
            self.ulog.info("stored token is no longer valid (%s); logging in", short_error(exc))
            self.keystore.delete(TOKEN_KIND, self.key_name)
            return self._login()
        if info.expires_at - self.clock.time() < 2:
            return self._login()
        self._adopt(Token(secret, info), resumed=True)
        self._schedule("renew", self.clock.time())  # renew at once: learns whether it still extends

    def _acquiring(self) -> None:
        if self._status.state == S.IDLE:
            self._set_status(state=S.ACQUIRING)

    def _login(self) -> None:
        self._acquiring()
        try:
            creds = self.aws.credentials()
            self.on_aws_status(S.VALID, "", "")
        except SignInNeededError as exc:
            self.on_aws_status(S.NEEDS_SIGN_IN, short_error(exc), "")
            return self._blocked(S.NEEDS_SIGN_IN, exc, self.tuning.sign_in_recheck)
        except TransientError as exc:
            self.on_aws_status(S.BACKOFF, short_error(exc), "")
            return self._retry("login", exc)
        except DbtunneldError as exc:
            self.on_aws_status(S.FAILED, short_error(exc), "")
            return self._blocked(S.FAILED, exc, self.tuning.failed_recheck)
        dlog.register_secret(creds.secret_key)
        dlog.register_secret(creds.token)
        self.vault.use_token(None)
        try:
            token = self.vault.login_aws_iam(creds.access_key, creds.secret_key, creds.token,
                                             profile_region=self.aws.profile_region)
        except TransientError as exc:
            return self._retry("login", exc)
        except DbtunneldError as exc:
            return self._blocked(S.FAILED, exc, self.tuning.failed_recheck)
        self.logins += 1
        self._adopt(token, resumed=False)
        self._plan()

    def _adopt(self, token: Token, *, resumed: bool) -> None:
        info: TokenInfo = token.info
        dlog.register_secret(token.secret)
        self.keystore.set(TOKEN_KIND, self.key_name, token.secret)
        with self._cond:
            self._token, self._failure = token, None
            self._issued_at = info.issued_at
            self._expires_at = info.expires_at
            self._renewable = info.renewable
            self._increment = info.creation_ttl or info.ttl
            self._grace = jittered_grace(self._increment, self.rng.random())
            self._issued[info.accessor] = info.issued_at
            if info.explicit_max_expires_at is not None:
                self._max_known[info.accessor] = info.explicit_max_expires_at
        self.vault.use_token(token.secret)
        self.ulog.info("%s token %s (ttl %.0f s, renewable %s)", "resumed" if resumed else "new",
                       info.accessor, info.ttl, info.renewable)
        self._blocked_msg = ""
        self._set_status(state=S.VALID, identity=info.accessor, expires_at=finite(info.expires_at), last_error="")
        if not resumed:
            self._emit("vault.login", detail=f"accessor {info.accessor}")
        self._changed()

    def _changed(self) -> None:
        with self._cond:
            self.generation += 1
        self.on_token_change()

    def _renew(self) -> None:
        tok = self._token
        if tok is None:
            return self._login()
        self.vault.use_token(tok.secret)
        try:
            granted, renewable = self.vault.renew_self(self._increment)
        except TransientError as exc:
            return self._renew_failed(exc)
        except DbtunneldError as exc:
            self.ulog.info("token %s can no longer be renewed (%s); logging in", tok.info.accessor, short_error(exc))
            return self._drop_and_login()
        now = self.clock.time()
        self.renewals += 1
        learned = False
        with self._cond:
            self._expires_at, self._renewable = now + granted, renewable
            if renewal_capped(self._increment, granted) and tok.info.accessor not in self._max_known:
                self._max_known[tok.info.accessor] = now + granted
                self._learned_lifetime = now + granted - self._issued_at
                learned = True
        if learned:
            self.ulog.info("token %s reaches its max TTL in %.0f s; will log in again before", tok.info.accessor, granted)
            self._changed()
        self._set_status(state=S.VALID, expires_at=self._expires_at, last_error="")
        self._plan()

    def _renew_failed(self, exc: DbtunneldError) -> None:
        self.failures += 1
        now = self.clock.time()
        delay = retry_within(self.tuning.backoff.delay(self._attempt, self.rng.random()), now, self._expires_at, self._grace)
        if delay is None:
            self.ulog.warning("renewing the token failed (%s); no retry fits before it expires: logging in again",
                              short_error(exc))
            self._set_status(last_error=short_error(exc))
            return self._login()
        self._attempt += 1
        self.ulog.warning("renewing the token failed (%s); retry %d in %.1f s", short_error(exc), self._attempt, delay)
        self._set_status(state=S.BACKOFF if now >= self._expires_at else S.VALID, last_error=short_error(exc))
        self._schedule("renew", now + delay)

    def _verify(self) -> None:
        tok = self._token
        if tok is None:
            return self._login()
        self.vault.use_token(tok.secret)
        try:
            self.vault.lookup_self()
        except TransientError as exc:
            self.ulog.warning("checking the token failed (%s); renewing as planned", short_error(exc))
            return self._plan()
        except DbtunneldError as exc:
            self.ulog.info("token %s was rejected (%s); logging in", tok.info.accessor, short_error(exc))
            return self._drop_and_login()
        self._plan()

    def _drop_and_login(self) -> None:
        with self._cond:
            self._token = None
        self.keystore.delete(TOKEN_KIND, self.key_name)
        self._login()

    def _retry(self, action: str, exc: DbtunneldError) -> None:
        self.failures += 1
        delay = self.tuning.backoff.delay(self._attempt, self.rng.random())
        self._attempt += 1
        self.ulog.warning("%s failed (%s); retry %d in %.1f s", "logging in to Vault" if action == "login" else
                          "resuming the stored token", short_error(exc), self._attempt, delay)
        still_valid = self.current() is not None
        self._set_status(state=S.VALID if still_valid else S.BACKOFF, last_error=short_error(exc))
        self._schedule(action, self.clock.time() + delay)

    def _blocked(self, state: CredentialState, exc: DbtunneldError, recheck: float) -> None:
        """Nothing changes until the user acts: say it once, re-check slowly."""
        if self._blocked_msg != short_error(exc):
            self._blocked_msg = short_error(exc)
            self.ulog.warning("%s", self._blocked_msg)
        with self._cond:
            self._failure = exc
        still_valid = self.current() is not None
        self._set_status(state=S.VALID if still_valid and state != S.FAILED else state, last_error=short_error(exc))
        self._schedule("login", self.clock.time() + recheck)

    # -- shutdown

    def revoke(self, timeout: float) -> bool:
        """Revoke the token (used when it cannot be kept for a restart)."""
        tok = self._token
        if tok is None:
            return True
        client = self.make_vault(replace(self.config, timeout=max(0.5, timeout)))
        try:
            client.use_token(tok.secret)
            client.revoke_self()
            with self._cond:
                self._token = None          # gone for good: nothing may use it (or revoke it) again
            self.keystore.delete(TOKEN_KIND, self.key_name)
            self.ulog.info("revoked token %s", tok.info.accessor)
            return True
        except DbtunneldError as exc:
            self.ulog.warning("revoking token %s failed (%s); it expires on its own", tok.info.accessor, short_error(exc))
            return False
        finally:
            client.close()
