"""Reliable delivery over the data channel: resend timing, the unacknowledged window, reordering.

The channel itself is lossy at the message level (the service drops messages when a websocket
is recycled, and each side only deletes a message once the peer acknowledges it), so each side
keeps what it sent until acknowledged and resends it after a timeout, and the receiver delivers
in sequence order, holding early arrivals. Acknowledgements are selective: one per message.

AWS's clients resend only their oldest message, every 100 ms once it is older than the
timeout; here a message is also resent as soon as a later one is acknowledged (see
``OutgoingWindow``), so a lossy link does not serialise its repairs. The clock is injected:
these classes never read time themselves.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from enum import Enum
from typing import Generic, TypeVar

T = TypeVar("T")

INITIAL_RTT = 0.1
INITIAL_RTO = 0.2
CLOCK_GRANULARITY = 0.01
MAX_RTO = 1.0
GIVE_UP_AFTER = 300.0  # AWS's clients give up after 3000 resends 100 ms apart
REORDER_CAPACITY = 10_000


class RttEstimator:
    """Smoothed round-trip time and the resend timeout derived from it (Jacobson/Karels)."""

    def __init__(self, granularity: float = CLOCK_GRANULARITY, max_rto: float = MAX_RTO) -> None:
        self.srtt = INITIAL_RTT
        self.rttvar = 0.0
        self.rto = INITIAL_RTO
        self._granularity = granularity
        self._max_rto = max_rto

    def sample(self, rtt: float) -> None:
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.srtt - rtt)
        self.srtt = 0.875 * self.srtt + 0.125 * rtt
        self.rto = min(self.srtt + max(self._granularity, 4 * self.rttvar), self._max_rto)

    def back_off(self) -> None:
        """A resend timer fired: double the timeout until a clean sample resets it (RFC 6298 5.5)."""
        self.rto = min(self.rto * 2, self._max_rto)


@dataclass(slots=True)
class _Pending:
    raw: bytes
    first_sent: float
    last_sent: float
    attempts: int = 0  # resends so far
    ambiguous: bool = False  # last resent by the timer: an ack may be for an earlier copy


class OutgoingWindow:
    """Sent stream messages kept until acknowledged, and when to resend them.

    Two loss signals, as in TCP with RACK: an acknowledgement for a message sent *later* than
    an unacknowledged one marks the older one lost once a reordering allowance has passed
    (``lost``), which repairs random losses within a round trip; a single retransmission timer
    catches the rest (tail losses, a silent peer): when it fires the oldest message is resent
    and the timeout doubles until a clean round-trip sample resets it (``due``).

    ``span`` bounds how far the next sequence number may run ahead of the oldest unacknowledged
    one, which also bounds what the receiver must hold while a gap is being filled.
    """

    def __init__(self, span: int = 1024, estimator: RttEstimator | None = None) -> None:
        self.span = span
        self.rtt = estimator or RttEstimator()
        self._pending: dict[int, _Pending] = {}
        self._by_time: OrderedDict[int, None] = OrderedDict()  # by last transmission, oldest first
        self._oldest = 0
        self._timer: float | None = None  # when the retransmission timer fires
        self._latest_acked_send = float("-inf")  # send time of the newest-sent acknowledged message
        self.resends = 0
        self.timeouts = 0

    def __len__(self) -> int:
        return len(self._pending)

    def __contains__(self, seq: int) -> bool:
        return seq in self._pending

    def oldest(self) -> int | None:
        """The lowest unacknowledged sequence number, or None when all are acknowledged."""
        if not self._pending:
            return None
        while self._oldest not in self._pending:
            self._oldest += 1
        return self._oldest

    def has_room(self, next_seq: int) -> bool:
        oldest = self.oldest()
        return oldest is None or next_seq - oldest < self.span

    def add(self, seq: int, raw: bytes, now: float) -> None:
        if not self._pending:
            self._oldest = seq
        self._pending[seq] = _Pending(raw, now, now)
        self._by_time[seq] = None
        if self._timer is None:
            self._timer = now + self.rtt.rto

    def ack(self, seq: int, now: float) -> bool:
        """Forget ``seq``; True when it was pending. Only first transmissions feed the RTT (Karn)."""
        entry = self._pending.pop(seq, None)
        if entry is None:
            return False
        del self._by_time[seq]
        if entry.attempts == 0:
            self.rtt.sample(now - entry.last_sent)
        if not entry.ambiguous:
            self._latest_acked_send = max(self._latest_acked_send, entry.last_sent)
        self._timer = now + self.rtt.rto if self._pending else None
        return True

    def reorder_allowance(self) -> float:
        return min(max(self.rtt.srtt / 4, 0.002), 0.05)

    def lost(self, now: float) -> list[tuple[int, bytes]]:
        """Messages overtaken by a later-sent acknowledged one (RACK), marked as resent now."""
        limit = self._latest_acked_send - self.reorder_allowance()
        out = []
        while self._by_time:
            seq = next(iter(self._by_time))
            entry = self._pending[seq]
            if entry.last_sent >= limit:
                break
            self._mark_resent(seq, entry, now)
            out.append((seq, entry.raw))
        return out

    def due(self, now: float) -> list[tuple[int, bytes]]:
        """When the retransmission timer has fired: the oldest message, resent, and the timer backed off."""
        if self._timer is None or now < self._timer or not self._pending:
            return []
        seq = self.oldest()
        assert seq is not None
        entry = self._pending[seq]
        self._mark_resent(seq, entry, now)
        entry.ambiguous = True  # the first copy may only be slow; its ack must not mark others lost
        self.timeouts += 1
        self.rtt.back_off()
        self._timer = now + self.rtt.rto
        return [(seq, entry.raw)]

    def resend_all(self, now: float) -> list[tuple[int, bytes]]:
        """Every unacknowledged message in sequence order (after a reconnect or a pause)."""
        out = []
        for seq in sorted(self._pending):
            entry = self._pending[seq]
            self._mark_resent(seq, entry, now)
            entry.ambiguous = True  # the lost connection may have delivered the first copy
            entry.first_sent = now  # the give-up clock restarts with the new connection
            out.append((seq, entry.raw))
        self._timer = now + self.rtt.rto if self._pending else None
        return out

    def _mark_resent(self, seq: int, entry: _Pending, now: float) -> None:
        entry.ambiguous = False
        entry.attempts += 1
        entry.last_sent = now
        self._by_time.move_to_end(seq)
        self.resends += 1

    def next_deadline(self) -> float | None:
        """When the retransmission timer fires (None: nothing unacknowledged)."""
        return self._timer

    def stalled_for(self, now: float) -> float:
        """How long the oldest unacknowledged message has waited since it was first sent."""
        oldest = self.oldest()
        return 0.0 if oldest is None else now - self._pending[oldest].first_sent


class Verdict(Enum):
    DELIVER = "deliver"  # in order: these items are ready (acknowledge)
    BUFFERED = "buffered"  # early: held until the gap is filled (acknowledge)
    DUPLICATE = "duplicate"  # already delivered: acknowledge again, deliver nothing
    OVERFLOW = "overflow"  # early but no room: dropped unacknowledged, the sender will resend


class ReorderBuffer(Generic[T]):
    """In-order delivery of sequenced items that may arrive out of order or twice."""

    def __init__(self, capacity: int = REORDER_CAPACITY, expected: int = 0) -> None:
        self.capacity = capacity
        self.expected = expected
        self._held: dict[int, T] = {}

    def __len__(self) -> int:
        return len(self._held)

    def offer(self, seq: int, item: T) -> tuple[Verdict, list[T]]:
        if seq == self.expected:
            return Verdict.DELIVER, self._drain(item)
        if seq < self.expected:
            return Verdict.DUPLICATE, []
        if seq in self._held:
            return Verdict.BUFFERED, []
        if len(self._held) >= self.capacity:
            return Verdict.OVERFLOW, []
        self._held[seq] = item
        return Verdict.BUFFERED, []

    def _drain(self, first: T) -> list[T]:
        ready = [first]
        self.expected += 1
        while self._held:
            item = self._held.pop(self.expected, None)
            if item is None:
                break
            ready.append(item)
            self.expected += 1
        return ready
