"""The SSO keeper: keeps the AWS IAM Identity Center sign-in usable and decides "sign in needed".

Access tokens live about an hour; the SSO session (the refresh token) lasts the session duration
the organisation set (8 h by default, up to days). Like botocore's ``SSOTokenProvider``, the keeper
refreshes the access token when less than 15 minutes are left (``sso.refresh_sso_token``, which
writes the AWS CLI cache), so a whole session passes without a prompt. "Sign in needed" comes
only from the refresh outcome: no refresh token or registration, registration expired, legacy
profile, refresh refused. A sign-in done elsewhere (``aws sso login``) is picked up at the next
check. Profiles without SSO leave the keeper idle.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Callable

from ..adapters.aws import AwsSession
from ..adapters.sso import EXPIRY_WINDOW, refresh_sso_token
from ..core.errors import DbtunneldError, SignInNeededError, TransientError
from ..core.model import CredentialState
from ..core.timing import Clock
from .keeper import CredentialEvent, Keeper, Tuning, short_error

log = logging.getLogger(__name__)

S = CredentialState
MIN_CHECK = 1.0


def next_check(expires_at: float, now: float, window: float = EXPIRY_WINDOW) -> float:
    """When to look again at an access token ending at ``expires_at``: when the refresh window
    opens, or (short tokens, or one that could not be refreshed) halfway to its end."""
    refresh_at = expires_at - window
    if refresh_at > now:
        return refresh_at
    return now + max(MIN_CHECK, (expires_at - now) / 2)


class SsoKeeper(Keeper):
    """Refreshes the SSO token ahead of its expiry; reports VALID / NEEDS_SIGN_IN / FAILED."""

    kind = "sso"

    def __init__(self, aws: AwsSession, *, clock: Clock, emit: Callable[[CredentialEvent], None], tuning: Tuning,
                 rng: random.Random, on_result: Callable[[CredentialState, str], None]) -> None:
        super().__init__(aws.profile, clock, emit)
        self.aws = aws
        self.tuning = tuning
        self.rng = rng
        self.on_result = on_result
        self._next_at = clock.time()
        self._attempt = 0
        self._said = ""
        self._noticed = 0.0

    def check_soon(self) -> None:
        """Look at the sign-in now (after a sign-in, or when credentials were refused)."""
        with self._cond:
            self._next_at = self.clock.time()
        self.wake()

    def notice_expired(self, expires_at: float) -> None:
        """The cached access token ended at ``expires_at`` (the cache changed behind our back,
        or the machine slept): check it now, once per expired token seen."""
        if expires_at != self._noticed:
            self._noticed = expires_at
            self.check_soon()

    def run_once(self) -> float:
        now = self.clock.time()
        if now < self._next_at:
            return self._next_at - now
        self.steps += 1
        self._next_at = self._check(now)
        return max(0.0, self._next_at - self.clock.time())

    def _check(self, now: float) -> float:
        try:
            if self.aws.sso_settings() is None:
                return math.inf
            expires = refresh_sso_token(self.aws, clock=self.clock)
        except SignInNeededError as exc:
            return self._blocked(S.NEEDS_SIGN_IN, exc, now + self.tuning.sign_in_recheck)
        except TransientError as exc:
            delay = self.tuning.backoff.delay(self._attempt, self.rng.random())
            self._attempt += 1
            log.warning("checking the AWS SSO sign-in failed (%s); retry %d in %.1f s",
                        short_error(exc), self._attempt, delay)
            return now + delay
        except DbtunneldError as exc:
            return self._blocked(S.FAILED, exc, now + self.tuning.failed_recheck)
        self._attempt, self._said = 0, ""
        self._set_status(state=S.VALID, last_error="")
        self.on_result(S.VALID, "")
        return next_check(expires, self.clock.time())

    def _blocked(self, state: CredentialState, exc: DbtunneldError, recheck_at: float) -> float:
        if self._said != short_error(exc):
            self._said = short_error(exc)
            log.warning("%s", self._said)
        self._set_status(state=state, last_error=short_error(exc))
        self.on_result(state, short_error(exc))
        return recheck_at
