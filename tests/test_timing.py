"""Renewal and backoff maths (property tests) and the deterministic clock."""

from __future__ import annotations

import math
import threading

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from dbtunneld.core.timing import (
    MIN_RETRY,
    Backoff,
    FakeClock,
    Lifetime,
    Plan,
    clamp_margin,
    jittered_grace,
    plan_next,
    renew_delay,
    renewal_capped,
    replace_time,
    retry_within,
)

durations = st.floats(min_value=1.0, max_value=90 * 86400.0)
unit = st.floats(min_value=0.0, max_value=1.0)
now_ = st.floats(min_value=0.0, max_value=2e9)
margins = st.floats(min_value=0.0, max_value=86400.0)


@given(durations, unit)
def test_grace_is_ten_to_twenty_percent(duration, rnd):
    g = jittered_grace(duration, rnd)
    assert 0.1 * duration - 1e-9 <= g <= 0.2 * duration + 1e-9


@given(durations, unit)
def test_fresh_credential_renews_at_about_two_thirds_and_well_before_expiry(duration, rnd):
    grace = jittered_grace(duration, rnd)
    delay = renew_delay(duration, grace)
    assert 2 / 3 * duration <= delay <= 0.74 * duration
    assert duration - delay > grace  # leaves the grace untouched: a fresh lease is renewed, not replaced


@given(now_, durations, unit)
def test_plan_for_a_fresh_renewable_credential_is_a_renewal_before_expiry(now, duration, rnd):
    life = Lifetime(issued_at=now, expires_at=now + duration, duration=duration)
    grace = jittered_grace(duration, rnd)
    plan = plan_next(now, life, grace, margin=600)
    assert plan.action == "renew"
    assert now < plan.at < life.expires_at - grace


@given(now_, durations, st.floats(min_value=0.0, max_value=1.0), unit, margins)
def test_plan_is_never_in_the_past_nor_after_expiry(now, duration, elapsed_share, rnd, margin):
    issued = now - duration * elapsed_share
    life = Lifetime(issued_at=issued, expires_at=issued + duration, duration=duration,
                    max_expires_at=issued + duration)
    plan = plan_next(now, life, jittered_grace(duration, rnd), margin)
    assert plan.at >= now
    assert plan.at <= life.expires_at or plan.at == now


@given(margins, st.floats(min_value=0.0, max_value=1e7))
def test_margin_is_clamped_to_a_third_of_the_lifetime(margin, lifetime):
    m = clamp_margin(margin, lifetime)
    assert 0 <= m <= margin
    assert m <= lifetime / 3 + 1e-9


def test_margin_is_kept_when_the_lifetime_is_long():
    assert clamp_margin(600, 86400) == 600
    assert clamp_margin(600, 20) == pytest.approx(20 / 3)


@given(now_, durations, margins)
def test_replacement_uses_at_least_two_thirds_of_a_lifetime(issued, lifetime, margin):
    life = Lifetime(issued_at=issued, expires_at=issued + 5, duration=5, max_expires_at=issued + lifetime)
    at = replace_time(life, margin)
    assert at is not None
    assert issued + lifetime * 2 / 3 - 1e-6 <= at <= issued + lifetime


def test_unknown_end_means_no_planned_replacement_and_non_expiring_means_hold():
    assert replace_time(Lifetime(0, 10, 10), 5) is None
    assert plan_next(0, Lifetime(0, math.inf, 0, renewable=False), 1, 600) == Plan("hold", math.inf)


def test_non_renewable_credential_is_replaced_before_it_expires():
    life = Lifetime(issued_at=0, expires_at=3600, duration=3600, renewable=False)
    assert plan_next(10, life, 400, margin=600) == Plan("replace", 3000)


def test_capped_renewal_inside_the_grace_means_replace_now():
    # Renewal granted only 2 s of a 30 s TTL: renewing again would land in the grace.
    life = Lifetime(issued_at=0, expires_at=102, duration=30)
    assert plan_next(100, life, grace=4, margin=600) == Plan("replace", 100)


@given(st.floats(min_value=2.0, max_value=7200.0), st.floats(min_value=1.5, max_value=40.0), unit, margins)
@settings(max_examples=300)
def test_simulated_lifetime_replaces_before_the_max_ttl_with_bounded_renewals(ttl, max_factor, rnd, margin):
    """Drive plan_next like a keeper against a server that caps renewals at the max TTL."""
    max_ttl = ttl * max_factor
    t, life = 0.0, Lifetime(0.0, ttl, ttl)
    renewals = 0
    while True:
        plan = plan_next(t, life, jittered_grace(ttl, rnd), margin)
        assert plan.action in ("renew", "replace")
        assert t <= plan.at <= life.expires_at
        t = plan.at
        if plan.action == "replace":
            break
        renewals += 1
        assert renewals < 200, "renewal loop does not converge"
        granted = min(ttl, max_ttl - t)
        capped = renewal_capped(ttl, granted)
        life = Lifetime(0.0, t + granted, ttl, max_expires_at=t + granted if capped else None)
    assert t < max_ttl                       # replaced while still valid
    assert life.expires_at - t >= 0          # never after expiry
    assert renewals <= max_factor * 1.5 + 2  # about one renewal per 2/3 of a TTL


@given(st.integers(min_value=0, max_value=200), unit)
def test_backoff_stays_within_floor_and_maximum(attempt, rnd):
    b = Backoff(initial=0.5, maximum=30)
    d = b.delay(attempt, rnd)
    assert MIN_RETRY <= d <= 30
    assert d >= 0.5 * 0.8 - 1e-9


@given(st.integers(min_value=0, max_value=100), unit)
def test_backoff_never_decreases_with_attempts(attempt, rnd):
    b = Backoff(initial=0.5, maximum=30)
    assert b.delay(attempt + 1, rnd) >= b.delay(attempt, rnd)


def test_backoff_doubles():
    b = Backoff(initial=1, maximum=30, jitter=0)
    assert [b.delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


@given(st.floats(min_value=0.0, max_value=100.0), now_, st.floats(min_value=-10, max_value=1000), st.floats(min_value=0, max_value=50))
def test_retry_is_bounded_by_the_remaining_life(delay, now, remaining, grace):
    expires_at = now + remaining
    r = retry_within(delay, now, expires_at, grace)
    if r is None:
        assert expires_at - grace - now < MIN_RETRY
    else:
        assert MIN_RETRY <= r <= max(delay, MIN_RETRY)
        assert now + r <= expires_at - grace + 1e-6


@given(st.floats(min_value=1.0, max_value=1e6), st.floats(min_value=0.0, max_value=1e6))
def test_capped_means_granted_clearly_less_than_requested(requested, granted):
    assume(granted <= requested)
    if renewal_capped(requested, granted):
        assert granted < requested - 1.0 + 1e-9
    if granted >= requested - 0.5:
        assert not renewal_capped(requested, granted)


def test_fake_clock_auto_advance_runs_a_schedule_instantly():
    clock = FakeClock(100.0, auto_advance=True)
    stop = threading.Event()
    assert clock.wait(stop, 3600) is False
    assert clock.time() == 3700.0
    stop.set()
    assert clock.wait(stop, 10) is True
    assert clock.time() == 3700.0
    assert clock.waits == [3600, 10]


def test_fake_clock_manual_wait_wakes_on_advance_or_event():
    clock = FakeClock(0.0)
    ev = threading.Event()
    results = []
    t = threading.Thread(target=lambda: results.append(clock.wait(ev, 10)))
    t.start()
    assert clock.wait_for_waiters(1)
    clock.advance(9)
    assert t.is_alive()
    clock.advance(1)
    t.join(5)
    assert results == [False]

    t = threading.Thread(target=lambda: results.append(clock.wait(ev, 1000)))
    t.start()
    assert clock.wait_for_waiters(1)
    ev.set()
    t.join(5)
    assert results == [False, True]
    assert clock.time() == 10.0
