"""Revoking DB leases: one request per lease in parallel (tasks on the engine loop, each request on
its worker pool), bounded by a deadline, and an outcome per
lease (``model.LeaseOutcome``: revoked, or not, why, and until when the DB user stays valid).

A 403 on ``sys/leases/revoke`` (``vault.RevokeDeniedError``) is final for that lease: Vault's default
policy (hashicorp/vault vault/policy_store.go, ``defaultPolicy``) grants ``sys/leases/renew`` and
``sys/leases/lookup`` but not ``sys/leases/revoke``, and asking again cannot change the answer. The
lease leaves the leases file (the next start could not revoke it either) and the log says once, for
that lease, which policy line is missing and until when the user stays valid (``sys/leases/lookup``
when the caller does not know). Other failures (timeout, unreachable, no token) keep the lease in
the file: the next start tries again.

The fallback on quit is the token itself (``revoke_with_token``): revoking a token revokes every
lease it created (vault/expiration.go ``RevokeByToken`` marks them expired and the expiration
manager revokes them at once), and ``auth/token/revoke-self`` is in the default policy. It ends
every lease of that token, so the engine uses it on quit only, never for one cluster's disconnect.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from ..adapters.vault import REVOKE_POLICY_LINE, RevokeDeniedError
from ..core.errors import DbtunneldError
from ..core.model import LeaseOutcome
from .engine_loop import LoopClosedError
from .keeper import short_error

if TYPE_CHECKING:
    from .engine_loop import EngineLoop

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RevokeTarget:
    """A lease to revoke, with what the report needs (never a password)."""

    lease_id: str
    cluster: str
    username: str
    ends_at: float | None = None     # when the user ends on its own, when known (epoch seconds)
    token_accessor: str = ""         # the token that minted it, when known


def revoke_leases(targets: list[RevokeTarget], tokens: Any, store: Any, deadline: float,
                  engine: "EngineLoop") -> list[LeaseOutcome]:
    """Revoke ``targets`` in parallel with the current token of ``tokens`` (a ``TokenKeeper``), each
    request bounded by ``deadline`` (monotonic). Revoked and denied leases leave ``store``; the
    others stay there for the next start. Returns one outcome per target, in order. From any thread
    but the loop's own (there: ``await revoke_leases_async``)."""
    if not targets:
        return []
    left = max(0.0, deadline - time.monotonic())
    try:
        return engine.run(revoke_leases_async(targets, tokens, store, deadline, engine), left + 1.0)
    except (concurrent.futures.TimeoutError, LoopClosedError):
        outcomes = [_kept(t, "Vault did not answer before the revoke deadline") for t in targets]
        for outcome in outcomes:
            _record(outcome, store)
        return outcomes


async def revoke_leases_async(targets: list[RevokeTarget], tokens: Any, store: Any, deadline: float,
                              engine: "EngineLoop") -> list[LeaseOutcome]:
    """``revoke_leases`` on the engine loop: one blocking request per lease on the worker pool,
    each cut off at ``deadline`` (its worker ends its call in the background, bounded by the
    client timeout the request was given)."""
    if not targets:
        return []
    view = tokens.current()
    if view is None:
        outcomes = [_kept(t, "no valid Vault token to revoke with") for t in targets]
    else:
        outcomes = list(await asyncio.gather(*(_revoke_before(t, view.secret, tokens, deadline, engine)
                                               for t in targets)))
    for outcome in outcomes:
        _record(outcome, store)
    return outcomes


async def _revoke_before(target: RevokeTarget, secret: str, tokens: Any, deadline: float,
                         engine: "EngineLoop") -> LeaseOutcome:
    try:
        return await engine.run_blocking(_revoke_one, target, secret, tokens, deadline,
                                         timeout=max(0.0, deadline - time.monotonic()))
    except asyncio.TimeoutError:
        return _kept(target, "Vault did not answer before the revoke deadline")


def revoke_with_token(outcomes: list[LeaseOutcome], minted_by: dict[str, str], tokens: Any, store: Any,
                      deadline: float) -> list[LeaseOutcome]:
    """On quit: revoke the current token when leases it minted could not be revoked one by one;
    Vault then revokes them with it. Returns the outcomes, updated for the leases that covers."""
    view = tokens.current()
    pending = [o for o in outcomes if not o.revoked and view is not None and minted_by.get(o.lease_id) == view.accessor]
    left = deadline - time.monotonic()
    if not pending or left <= 0.05 or not tokens.revoke(left):
        return outcomes
    log.info("revoked the Vault token: Vault revokes the %d lease(s) it minted with it (%s)", len(pending),
             ", ".join(o.username for o in pending))
    covered = {o.lease_id for o in pending}
    for lease_id in covered:
        store.remove(lease_id)
    return [replace(o, revoked=True, how="token", reason="", hint="", valid_until=None, retried=False)
            if o.lease_id in covered else o for o in outcomes]


def _revoke_one(target: RevokeTarget, secret: str, tokens: Any, deadline: float) -> LeaseOutcome:
    left = deadline - time.monotonic()
    if left <= 0.05:
        return _kept(target, "no time left before the revoke deadline")
    client = tokens.make_vault(replace(tokens.config, timeout=max(0.2, left)))
    try:
        client.use_token(secret)
        client.revoke_lease(target.lease_id)
        return LeaseOutcome(target.cluster, target.username, target.lease_id, revoked=True, how="lease")
    except RevokeDeniedError as exc:
        until = target.ends_at or _lookup_end(client, target.lease_id)
        return LeaseOutcome(target.cluster, target.username, target.lease_id, revoked=False,
                            reason="Vault's policy does not allow sys/leases/revoke", hint=exc.hint,
                            valid_until=until)
    except DbtunneldError as exc:
        return _kept(target, short_error(exc))
    except Exception as exc:  # a bug: keep the lease for the next start, and show the traceback once
        log.exception("revoking lease %s failed with an internal error", target.lease_id)
        return _kept(target, f"internal error: {type(exc).__name__}: {exc}")
    finally:
        client.close()


def _lookup_end(client: Any, lease_id: str) -> float | None:
    try:
        end: float | None = client.lease_expires_at(lease_id)
        return end
    except DbtunneldError as exc:
        log.info("looking up lease %s failed (%s); its end stays unknown", lease_id, short_error(exc))
        return None


def _kept(target: RevokeTarget, reason: str) -> LeaseOutcome:
    return LeaseOutcome(target.cluster, target.username, target.lease_id, revoked=False, reason=reason,
                        valid_until=target.ends_at, retried=True)


def _record(outcome: LeaseOutcome, store: Any) -> None:
    """Log the outcome once and update the leases file (only a retried lease stays in it)."""
    if outcome.revoked:
        log.info("revoked user %s (lease %s)", outcome.username, outcome.lease_id)
    elif outcome.retried:
        log.warning("revoking user %s (lease %s) failed (%s); the next start tries again", outcome.username,
                    outcome.lease_id, outcome.reason)
    else:
        log.warning("cannot revoke user %s (lease %s): %s, so the DB user stays valid %s; to let dbtunneld "
                    "revoke it, add to the policy of your Vault role: %s", outcome.username, outcome.lease_id,
                    outcome.reason, valid_until_text(outcome.valid_until), REVOKE_POLICY_LINE)
    if outcome.revoked or not outcome.retried:
        store.remove(outcome.lease_id)


def valid_until_text(until: float | None, now: float | None = None) -> str:
    """``until 2026-12-04 16:55 UTC (in 55m)``, or ``until its lease expires`` when unknown."""
    if until is None:
        return "until its lease expires"
    left = max(0.0, until - (time.time() if now is None else now))
    stamp = datetime.fromtimestamp(until, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    hours, minutes = divmod(int(left // 60), 60)
    return f"until {stamp} (in {f'{hours}h{minutes:02d}m' if hours else f'{minutes}m'})"
