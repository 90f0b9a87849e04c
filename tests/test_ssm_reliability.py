"""Acknowledgement bookkeeping, resend timing and reordering (dbtunneld.adapters.ssm.reliability).

Time is a plain number passed in: no sleeps, no timing assertions on the real clock.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dbtunneld.adapters.ssm.reliability import (
    INITIAL_RTO,
    MAX_RTO,
    OutgoingWindow,
    ReorderBuffer,
    RttEstimator,
    Verdict,
)

# --- ReorderBuffer ------------------------------------------------------------------------------


def test_in_order_items_are_delivered_at_once():
    buf = ReorderBuffer()
    assert buf.offer(0, "a") == (Verdict.DELIVER, ["a"])
    assert buf.offer(1, "b") == (Verdict.DELIVER, ["b"])
    assert buf.expected == 2


def test_early_items_wait_for_the_gap_then_come_out_in_order():
    buf = ReorderBuffer()
    assert buf.offer(2, "c") == (Verdict.BUFFERED, [])
    assert buf.offer(1, "b") == (Verdict.BUFFERED, [])
    assert buf.offer(0, "a") == (Verdict.DELIVER, ["a", "b", "c"])
    assert len(buf) == 0 and buf.expected == 3


def test_duplicates_are_recognised_not_delivered_twice():
    buf = ReorderBuffer()
    buf.offer(0, "a")
    buf.offer(2, "c")
    assert buf.offer(0, "a") == (Verdict.DUPLICATE, [])  # already delivered
    assert buf.offer(2, "c") == (Verdict.BUFFERED, [])  # already held
    assert buf.offer(1, "b") == (Verdict.DELIVER, ["b", "c"])


def test_overflow_drops_early_items_unacknowledged():
    buf = ReorderBuffer(capacity=2)
    buf.offer(5, "x")
    buf.offer(6, "y")
    assert buf.offer(7, "z") == (Verdict.OVERFLOW, [])
    assert buf.offer(0, "a") == (Verdict.DELIVER, ["a"])  # the expected one always goes through


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=200), st.randoms())
def test_any_arrival_order_with_duplicates_delivers_each_item_once_in_order(extra, rnd):
    n = 41
    arrivals = list(range(n)) + extra  # every item at least once, some again
    rnd.shuffle(arrivals)
    buf = ReorderBuffer()
    out = []
    for seq in arrivals:
        out += buf.offer(seq, seq)[1]
    assert out == list(range(n))


# --- RttEstimator ---------------------------------------------------------------------------------


def test_rto_starts_like_the_plugin_and_follows_samples():
    est = RttEstimator()
    assert est.rto == INITIAL_RTO
    for _ in range(50):
        est.sample(0.004)
    assert est.rto == pytest.approx(0.004 + 0.01, abs=0.002)  # srtt + clock granularity


def test_rto_is_capped_and_backs_off_by_doubling():
    est = RttEstimator()
    est.sample(0.05)
    first = est.rto
    est.back_off()
    assert est.rto == pytest.approx(2 * first)
    for _ in range(10):
        est.back_off()
    assert est.rto == MAX_RTO
    est.sample(10.0)
    assert est.rto == MAX_RTO


# --- OutgoingWindow -------------------------------------------------------------------------------


def filled(n: int, now: float = 0.0, step: float = 0.0) -> OutgoingWindow:
    win = OutgoingWindow(span=64)
    for seq in range(n):
        win.add(seq, f"m{seq}".encode(), now + seq * step)
    return win


def test_nothing_is_resent_before_the_timer_fires():
    win = filled(3)
    assert win.next_deadline() == pytest.approx(INITIAL_RTO)
    assert win.due(INITIAL_RTO - 0.001) == []


def test_timer_resends_only_the_oldest_and_backs_off():
    win = filled(3)
    assert win.due(INITIAL_RTO) == [(0, b"m0")]
    assert win.timeouts == 1
    assert win.next_deadline() == pytest.approx(INITIAL_RTO + 2 * INITIAL_RTO)
    assert win.due(INITIAL_RTO + 2 * INITIAL_RTO) == [(0, b"m0")]  # still the oldest, timeout doubled again
    assert win.next_deadline() == pytest.approx(3 * INITIAL_RTO + 4 * INITIAL_RTO)


def test_an_acknowledgement_restarts_the_timer_and_clean_samples_reset_backoff():
    win = filled(3)
    win.due(INITIAL_RTO)  # backs off to 0.4
    win.ack(1, INITIAL_RTO + 0.01)  # first transmission: a clean RTT sample
    assert win.rtt.rto < 2 * INITIAL_RTO
    assert win.next_deadline() == pytest.approx(INITIAL_RTO + 0.01 + win.rtt.rto)


def test_retransmitted_messages_give_no_rtt_sample():
    win = filled(1)
    win.due(INITIAL_RTO)
    srtt = win.rtt.srtt
    win.ack(0, 5.0)
    assert win.rtt.srtt == srtt


def test_a_later_message_acknowledged_marks_the_earlier_one_lost():
    win = filled(3, step=0.05)  # sent at 0, 0.05, 0.1; allowance: a quarter of the smoothed RTT
    assert win.ack(2, 0.11)
    lost = win.lost(0.11)
    assert [seq for seq, _ in lost] == [0, 1]
    assert win.lost(0.111) == []  # marked resent: not lost again until overtaken again


def test_reordering_allowance_keeps_close_neighbours():
    win = filled(2, step=0.01)  # 10 ms apart: within a quarter of the ~90 ms smoothed RTT
    win.ack(1, 0.02)
    assert win.lost(0.02) == []


def test_acknowledgement_of_a_timer_resend_does_not_mark_others_lost():
    win = filled(4, step=0.05)
    win.due(1.0)  # message 0 resent at t=1.0 by the timer; its first copy may just be slow
    win.ack(0, 1.001)  # ambiguous: may be the ack of the first copy
    assert win.lost(1.001) == []  # 1..3 were sent before t=1.0 but are not overtaken
    win.ack(3, 1.002)
    assert [seq for seq, _ in win.lost(1.002)] == [1, 2]


def test_span_bounds_how_far_ahead_the_sender_runs():
    win = OutgoingWindow(span=4)
    for seq in range(4):
        win.add(seq, b"x", 0.0)
    assert not win.has_room(4)
    win.ack(1, 0.001)
    assert not win.has_room(4)  # the oldest (0) still pins the window
    win.ack(0, 0.001)
    assert win.oldest() == 2 and win.has_room(4) and win.has_room(5) and not win.has_room(6)


def test_resend_all_after_a_reconnect_is_in_order_and_restarts_the_give_up_clock():
    win = filled(3)
    win.ack(1, 0.01)
    assert win.stalled_for(100.0) == pytest.approx(100.0)
    assert [seq for seq, _ in win.resend_all(100.0)] == [0, 2]
    assert win.stalled_for(100.0) == 0.0
    assert win.next_deadline() == pytest.approx(100.0 + win.rtt.rto)


def test_acknowledging_unknown_or_twice_is_harmless():
    win = filled(1)
    assert win.ack(0, 0.01)
    assert not win.ack(0, 0.02)
    assert not win.ack(99, 0.02)
    assert win.next_deadline() is None and win.oldest() is None


def test_lossy_link_simulation_delivers_everything_with_few_resends():
    """A FIFO link with constant delay losing 5% of messages and acknowledgements each way."""
    rnd = random.Random(7)
    delay, drop, total = 0.005, 0.05, 3000
    win, buf = OutgoingWindow(span=256), ReorderBuffer()
    in_flight: list[tuple[float, str, int]] = []
    now, next_seq, delivered = 0.0, 0, []

    def transmit(kind: str, seq: int) -> None:
        if rnd.random() >= drop:
            in_flight.append((now + delay, kind, seq))

    while len(delivered) < total:
        if next_seq < total and win.has_room(next_seq):
            win.add(next_seq, b"", now)
            transmit("data", next_seq)
            next_seq += 1
            now += 0.0001
            continue
        in_flight.sort()
        deadline = win.next_deadline()
        if in_flight and (deadline is None or in_flight[0][0] <= deadline):
            now, kind, seq = in_flight.pop(0)
            if kind == "data":
                verdict, ready = buf.offer(seq, seq)
                delivered += ready
                if verdict is not Verdict.OVERFLOW:
                    transmit("ack", seq)
            elif win.ack(seq, now):
                for lost, _ in win.lost(now):
                    transmit("data", lost)
        else:
            now = deadline
            for seq, _ in win.due(now):
                transmit("data", seq)
    assert delivered == list(range(total))
    assert win.resends < total * 0.2  # about one per lost message or lost acknowledgement
    assert now < 2.0  # repairs take round trips, not a timer tick each
