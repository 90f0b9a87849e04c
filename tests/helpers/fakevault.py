"""A Vault model for deterministic engine tests, on a FakeClock.

``FakeVaultServer`` follows the Vault semantics the engine relies on: tokens and leases with TTLs
capped at a max TTL, renewals that stop extending at the max, leases revoked when the token that
minted them expires or is revoked, 403 for a dead token, 400 for an unknown lease. It can be
taken "down" (every call raises TransientError and is counted) or made to hang.
``FakeVaultClient`` has the interface of ``dbtunneld.adapters.vault.VaultClient``. ``run_virtual`` drives
an unthreaded engine through virtual time with the engine's own ``Scheduler``.
"""

from __future__ import annotations

import itertools
import math
import secrets
import time
from dataclasses import dataclass, field

from dbtunneld.adapters.aws import AwsCredentials
from dbtunneld.adapters.vault import LeaseGrant, LeaseRenewal, Token, TokenInfo, VaultRequestError
from dbtunneld.core.errors import PermissionDeniedError, SignInNeededError, TransientError


@dataclass
class _Tok:
    secret: str
    accessor: str
    issued: float
    expires: float
    max: float
    revoked: bool = False


@dataclass
class _Lease:
    lease_id: str
    username: str
    password: str
    role: str
    token: str
    issued: float
    expires: float
    max: float
    revoked_at: float | None = None
    revoked_by_client: bool = False


@dataclass
class FakeVaultServer:
    clock: object
    token_ttl: float = 60
    token_max: float = 300
    lease_ttl: float = 60
    lease_max: float = 300
    roles: tuple[str, ...] = ("orders-ro", "billing-ro")
    denied_roles: tuple[str, ...] = ()
    down: bool = False
    hang_seconds: float = 0.0            # real seconds each call blocks (for bounded-shutdown tests)
    tokens: dict[str, _Tok] = field(default_factory=dict)
    leases: dict[str, _Lease] = field(default_factory=dict)
    calls: list[tuple[float, str]] = field(default_factory=list)
    failed_calls: list[tuple[float, str]] = field(default_factory=list)
    _ids: itertools.count = field(default_factory=itertools.count)

    # -- state queries
    def now(self) -> float:
        return self.clock.time()

    def token_alive(self, secret: str) -> bool:
        t = self.tokens.get(secret)
        return t is not None and not t.revoked and self.now() < t.expires

    def lease_alive(self, lease_id: str, at: float | None = None) -> bool:
        at = self.now() if at is None else at
        lz = self.leases.get(lease_id)
        if lz is None or (lz.revoked_at is not None and lz.revoked_at <= at) or at >= lz.expires:
            return False
        tok = self.tokens[lz.token]
        return not tok.revoked and at < tok.expires

    def can_log_in(self, username: str, password: str) -> bool:
        """What MariaDB would answer: the user exists (lease alive) and the password matches."""
        return any(lz.username == username and lz.password == password and self.lease_alive(lz.lease_id)
                   for lz in self.leases.values())

    def alive_users(self) -> list[str]:
        return [lz.username for lz in self.leases.values() if self.lease_alive(lz.lease_id)]

    # -- calls
    def _call(self, what: str) -> None:
        if self.hang_seconds:
            time.sleep(self.hang_seconds)
        if self.down:
            self.failed_calls.append((self.now(), what))
            raise TransientError(f"Vault is unreachable while {what} (ConnectionError)")
        self.calls.append((self.now(), what))

    def _token(self, secret: str | None) -> _Tok:
        if not secret or not self.token_alive(secret):
            raise PermissionDeniedError("Vault refused the request: permission denied")
        return self.tokens[secret]

    def login(self) -> Token:
        self._call("login")
        now = self.now()
        secret = "hvs." + secrets.token_urlsafe(24)
        tok = _Tok(secret, f"acc-{next(self._ids)}", now, now + self.token_ttl, now + self.token_max)
        self.tokens[secret] = tok
        info = TokenInfo(tok.accessor, self.token_ttl, True, self.token_ttl, now, tok.expires)
        return Token(secret, info)

    def lookup(self, secret) -> TokenInfo:
        self._call("lookup-self")
        tok = self._token(secret)
        now = self.now()
        return TokenInfo(tok.accessor, tok.expires - now, True, self.token_ttl, tok.issued, tok.expires)

    def renew_token(self, secret, increment) -> tuple[float, bool]:
        self._call("renew-self")
        tok = self._token(secret)
        now = self.now()
        tok.expires = min(now + increment, tok.max)
        return tok.expires - now, True

    def revoke_token(self, secret) -> None:
        self._call("revoke-self")
        self._token(secret).revoked = True

    def creds(self, secret, role) -> LeaseGrant:
        self._call("creds")
        tok = self._token(secret)
        if role in self.denied_roles:
            raise PermissionDeniedError(f"Vault refused reading database/creds/{role}: permission denied")
        if role not in self.roles:
            raise VaultRequestError(f"Vault rejected reading database/creds/{role}: unknown role")
        now = self.now()
        n = next(self._ids)
        lz = _Lease(f"database/creds/{role}/lease{n}", f"v-{role}-{n}", "pw-" + secrets.token_urlsafe(16), role,
                    tok.secret, now, now + self.lease_ttl, now + self.lease_max)
        self.leases[lz.lease_id] = lz
        return LeaseGrant(lz.lease_id, self.lease_ttl, True, lz.username, lz.password, now)

    def renew_lease(self, secret, lease_id, increment) -> LeaseRenewal:
        self._call("renew-lease")
        self._token(secret)
        if not self.lease_alive(lease_id):
            raise VaultRequestError("Vault rejected renewing: lease not found or lease is not renewable")
        lz = self.leases[lease_id]
        now = self.now()
        lz.expires = min(now + increment, lz.max)
        return LeaseRenewal(lease_id, lz.expires - now, True)

    def revoke_lease(self, secret, lease_id) -> None:
        self._call("revoke-lease")
        self._token(secret)
        lz = self.leases.get(lease_id)
        if lz is not None and lz.revoked_at is None:
            lz.revoked_at = self.now()
            lz.revoked_by_client = True


class FakeVaultClient:
    """The ``VaultClient`` interface on a ``FakeVaultServer``."""

    instances = 0

    def __init__(self, server: FakeVaultServer, config) -> None:
        self.server = server
        self.config = config
        self.token: str | None = None
        FakeVaultClient.instances += 1

    @property
    def address(self) -> str:
        return self.config.address

    def use_token(self, token):
        self.token = token

    def close(self):
        pass

    def login_aws_iam(self, access_key, secret_key, session_token, *, profile_region=str):
        tok = self.server.login()
        self.token = tok.secret
        return tok

    def lookup_self(self):
        return self.server.lookup(self.token)

    def renew_self(self, increment):
        return self.server.renew_token(self.token, increment)

    def revoke_self(self):
        self.server.revoke_token(self.token)

    def database_creds(self, role):
        return self.server.creds(self.token, role)

    def renew_lease(self, lease_id, increment):
        return self.server.renew_lease(self.token, lease_id, increment)

    def revoke_lease(self, lease_id):
        self.server.revoke_lease(self.token, lease_id)


class FakeAws:
    """The ``AwsSession`` interface the engine uses, with a switchable SSO sign-in."""

    def __init__(self, signed_in: bool = True) -> None:
        self.signed_in = signed_in
        self.profile = "dev-sso"
        self.calls = 0

    def credentials(self) -> AwsCredentials:
        self.calls += 1
        if not self.signed_in:
            raise SignInNeededError("AWS SSO sign-in needed for profile 'dev-sso': the SSO session is missing or expired")
        return AwsCredentials("ASIAFAKE", "fake-secret-key-value", "fake-session-token-value", None, "sso")

    def caller_arn(self) -> str:
        return "arn:aws:sts::123456789012:assumed-role/db-developer/alice"

    def profile_region(self) -> str:
        return "eu-west-1"

    def sso_expires_at(self):
        return None

    def sso_settings(self):
        return None            # the SSO keeper stays idle; sign-in is switched with ``signed_in``

    def cached_sso_token(self):
        return None

    def reset(self):
        pass


def run_virtual(engine, clock, seconds: float, on_step=None, max_steps: int = 100000) -> int:
    """Drive an engine built with ``threaded=False`` for ``seconds`` of virtual time: its own
    ``Scheduler`` (the class production drives on the engine loop), see ``run_schedule``."""
    return run_schedule(engine.scheduler, clock, seconds, on_step, max_steps)


def run_schedule(scheduler, clock, seconds: float, on_step=None, max_steps: int = 100000) -> int:
    """Drive ``scheduler`` (``dbtunneld.engine.scheduler.Scheduler``) for ``seconds`` of virtual time on
    ``clock`` (a FakeClock): step every due unit (``take_due`` / ``stepped``), then advance the
    clock to ``next_due``. A unit runs when its own delay is due or when it was woken;
    ``on_step(unit)`` is called after every step (for invariants). Returns the number of steps
    (a busy loop shows here)."""
    end = clock.monotonic() + seconds
    steps = 0
    while steps < max_steps:
        due = scheduler.take_due()
        for unit in due:
            delay = unit.step()
            steps += 1
            assert delay >= 0 and not math.isnan(delay), (unit, delay)
            scheduler.stepped(unit, delay)
            if on_step is not None:
                on_step(unit)
        if due:
            continue
        nxt = scheduler.next_due()
        if nxt > end:
            clock.advance(max(0.0, end - clock.monotonic()))
            return steps
        clock.advance(max(0.0, nxt - clock.monotonic()))
    raise AssertionError(f"no progress after {max_steps} steps: a busy loop")
