"""The agent's outgoing message buffer and retransmission timeout, for the SSM stand-in.

From aws/amazon-ssm-agent ``agent/session/datachannel/datachannel.go``:
``AddDataToOutgoingMessageBuffer`` (a full buffer keeps nothing more: capacity
``OutgoingMessageBufferCapacity`` = 100000 in ``agent/session/config/config.go``),
``ProcessAcknowledgedMessage`` (an acknowledgement removes the message and feeds its round trip,
measured from its *last* send, to ``calculateRetransmissionTimeout``: RTT and RTTVAR with gains
1/8 and 1/4, timeout RTT + max(10 ms, 4 RTTVAR), at most 1 s; 100 ms and 200 ms at first) and
``ResendStreamDataMessageScheduler`` (only the front message, when its last send is older than
the timeout: ``oldest_due``). ``all_due`` is the stand-in's fast mode, not the agent's.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

OUTGOING_CAPACITY = 100_000


class RetransmissionTimer:
    """``calculateRetransmissionTimeout``: the agent's RTT estimate (samples every ack, resends too)."""

    def __init__(self) -> None:
        self.rtt, self.rttvar, self.timeout = 0.1, 0.0, 0.2

    def sample(self, rtt: float) -> None:
        self.rttvar = 0.75 * self.rttvar + 0.25 * abs(self.rtt - rtt)
        self.rtt = 0.875 * self.rtt + 0.125 * rtt
        self.timeout = min(self.rtt + max(0.01, 4 * self.rttvar), 1.0)


class OutgoingBuffer:
    """Sent messages until acknowledged, oldest first (``OutgoingMessageBuffer``)."""

    def __init__(self) -> None:
        self.timer = RetransmissionTimer()
        self._items: OrderedDict[int, list[Any]] = OrderedDict()  # seq -> [raw, last_sent]

    def __len__(self) -> int:
        return len(self._items)

    def add(self, seq: int, raw: bytes, now: float) -> None:
        if len(self._items) < OUTGOING_CAPACITY:  # AddDataToOutgoingMessageBuffer: full -> not kept
            self._items[seq] = [raw, now]

    def ack(self, seq: int, now: float) -> bool:
        item = self._items.pop(seq, None)
        if item is not None:
            self.timer.sample(now - item[1])
        return item is not None

    def oldest_due(self, now: float) -> list[bytes]:
        """The realistic scheduler: the front message only, if its last send has timed out."""
        if not self._items:
            return []
        item = next(iter(self._items.values()))
        if now - item[1] <= self.timer.timeout:
            return []
        item[1] = now
        return [item[0]]

    def all_due(self, now: float) -> list[bytes]:
        due = [item for item in self._items.values() if now - item[1] > self.timer.timeout]
        for item in due:
            item[1] = now
        return [item[0] for item in due]

    def everything(self, now: float) -> list[bytes]:
        for item in self._items.values():
            item[1] = now
        return [item[0] for item in self._items.values()]
