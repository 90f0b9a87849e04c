"""Sequencing on an SSM data channel: numbered messages out (kept until acknowledged, resent on
their own deadline, held while the agent pauses publication, a stall noticed), and messages in
(acknowledged, reordered, delivered in sequence).

``SequencedFlow`` is the part of ``channel.DataChannel`` that owns the sequence numbers both ways;
the window maths is ``reliability``'s, the websocket's lifecycle is the channel's.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ...core.errors import ClosedError, DbtunneldError, ProtocolError, TransientError
from . import message as m
from .channel_handshake import AgentHandshake
from .channel_options import ChannelOptions
from .encryption import ENCRYPTED_OUTGOING
from .reliability import OutgoingWindow, ReorderBuffer, Verdict
from .wsclient import WsClient

log = logging.getLogger(__name__)

IDLE_RESEND_WAIT = 3600.0


class SequencedFlow:
    """Sending, acknowledging, retransmitting and pausing; the channel sets the state below."""

    session_id: str
    options: ChannelOptions
    closed: asyncio.Event
    stats: dict[str, int]
    _label: str
    _clock: Callable[[], float]
    _agent: AgentHandshake
    _ws: WsClient | None
    _out: OutgoingWindow
    _in: ReorderBuffer[m.AgentMessage]
    _next_seq: int
    _paused: bool
    _paused_at: float
    _last_received: float
    _last_progress: float
    _in_sink: bool
    _closing: bool
    _changed: asyncio.Event
    _resend_wakeup: asyncio.Event

    async def _finish(self, error: DbtunneldError | None) -> None:
        raise NotImplementedError

    async def _dispatch(self, msg: m.AgentMessage) -> None:
        raise NotImplementedError

    async def _send_stream(self, payload_type: int, payload: bytes, *, force: bool = False) -> None:
        await self._wait_sendable(force)
        if self._agent.cipher is not None and payload_type in ENCRYPTED_OUTGOING:
            payload = self._agent.cipher.encrypt(payload)
        seq = self._next_seq
        self._next_seq += 1
        raw = m.encode(m.stream_message(m.INPUT_STREAM, seq, payload_type, payload))
        idle = not len(self._out)
        self._out.add(seq, raw, self._clock())
        if idle:
            self._resend_wakeup.set()
        self.stats["sent"] += 1
        await self._send_raw(raw)

    async def _wait_sendable(self, force: bool = False) -> None:
        while True:
            if self.closed.is_set() or (self._closing and not force):
                raise ClosedError(f"SSM session {self.session_id} is closed")
            if self._ws is not None and not self._paused and self._out.has_room(self._next_seq):
                return
            self._changed.clear()
            await self._changed.wait()

    async def _send_raw(self, raw: bytes) -> bool:
        ws = self._ws
        return ws is not None and await ws.send(raw)

    def _send_now(self, raw: bytes) -> bool:
        """Queue without waiting for buffer room (acknowledgements: small, and must not stall reads)."""
        ws = self._ws
        return ws is not None and ws.send_nowait(raw)

    async def _resend(self, messages: list[tuple[int, bytes]]) -> None:
        self.stats["resent"] += len(messages)
        for _seq, raw in messages:
            if not await self._send_raw(raw):
                return

    async def _resend_loop(self) -> None:
        while not self.closed.is_set():
            now = self._clock()
            if self._paused and now - self._paused_at > self.options.pause_cap:
                log.warning("%s pause_publication not lifted after %.0f s; sending again", self._label, self.options.pause_cap)
                self._set_paused(False)
            if self._ws is not None and not self._paused:
                await self._resend(self._out.due(now))
            if self._ws is not None:
                stall = self.stall_reason(now)
                if stall:
                    await self._finish(TransientError(f"SSM session {self.session_id} stalled: {stall}", hint="a new session is started"))
                    return
                if len(self._out) and self._out.stalled_for(now) > self.options.give_up_after:
                    await self._finish(TransientError(f"SSM session {self.session_id}: the agent acknowledged nothing for {self.options.give_up_after:.0f} s"))
                    return
            await self._sleep_until_due()

    async def _sleep_until_due(self) -> None:
        """Until the retransmission timer may fire (or something is sent when nothing was pending)."""
        deadline = self._out.next_deadline()
        wait = IDLE_RESEND_WAIT if deadline is None else max(0.002, deadline - self._clock())
        if deadline is not None and (self._ws is None or self._paused):
            wait = max(wait, 0.05)
        if self._paused:
            wait = min(wait, max(0.01, self._paused_at + self.options.pause_cap - self._clock()))
        self._resend_wakeup.clear()
        if deadline is not None or self._paused:
            await asyncio.sleep(wait)
            return
        try:
            await asyncio.wait_for(self._resend_wakeup.wait(), wait)
        except asyncio.TimeoutError:
            pass

    def stall_reason(self, now: float) -> str:
        """Why the channel looks stalled ('' when it does not): data waits for an acknowledgement
        and neither an acknowledgement nor any other message came for ``stall_after`` s. Time spent with our own reader back-pressured (a slow
        local client: acknowledgements cannot be read then) does not count."""
        if self._ws is None or not len(self._out) or self._reader_blocked():
            self._last_progress = now
            return ""
        waiting = min(self._out.stalled_for(now), now - self._last_progress, now - self._last_received)
        if waiting <= self.options.stall_after:
            return ""
        return f"no acknowledgement and no message from the service for {waiting:.0f} s ({len(self._out)} messages waiting)"

    def _reader_blocked(self) -> bool:
        ws = self._ws
        return self._in_sink or (ws is not None and (ws.reading_paused or ws.backlog > 0))

    def _wake(self) -> None:
        self._changed.set()
        self._resend_wakeup.set()

    async def _on_stream(self, msg: m.AgentMessage) -> None:
        verdict, ready = self._in.offer(msg.sequence_number, msg)
        if verdict is not Verdict.DELIVER:
            self.stats[verdict.value] += 1
        if verdict is not Verdict.OVERFLOW:
            self._send_now(m.encode(m.acknowledgement(msg)))
        for item in ready:
            self.stats["received"] += 1
            await self._dispatch(item)

    async def _on_ack(self, msg: m.AgentMessage) -> None:
        try:
            seq = m.acknowledged_sequence(msg)
        except ProtocolError as exc:
            log.warning("%s %s", self._label, exc.message)
            return
        now = self._clock()
        if self._out.ack(seq, now):
            self._last_progress = now
            self._changed.set()
            if not self._paused:
                lost = self._out.lost(now)
                if lost:
                    await self._resend(lost)

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        self._paused = paused
        self._paused_at = self._clock()
        log.info("%s agent %s publication", self._label, "paused" if paused else "resumed")
        if not paused:
            asyncio.ensure_future(self._resend(self._out.resend_all(self._clock())))
        self._wake()
