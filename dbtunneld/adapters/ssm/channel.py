"""One SSM data channel: the websocket to the stream URL, spoken like the session-manager-plugin.

Owns the public stream (start, send, close) and the websocket's lifecycle (connect, resume,
terminate); the handshake is ``channel_handshake``'s, sequencing and retransmission ``channel_flow``'s.

Lifecycle (all on one asyncio loop):

1. connect the websocket (upgrade signed with SigV4 for ``ssmmessages``) and send the
   OpenDataChannel text message with the session token;
2. the agent's handshake: answer HandshakeRequest (session type, our client version), wait for
   HandshakeComplete;
3. stream data: every ``input_stream_data`` we send is kept until acknowledged and resent on
   its own deadline (``reliability``); every ``output_stream_data`` we receive is acknowledged
   and delivered in sequence order to ``sink``;
4. ``pause_publication`` stops our sending (new data and resends) until ``start_publication``,
   any acknowledgement or stream message (the pause is soft, as in the agent's
   ``datachannel.go`` ``handleAcknowledgeMessage`` / ``handleStreamDataMessage``), or
   ``pause_cap`` seconds; the give-up clock keeps running meanwhile (the service may send a
   pause with no start after it);
5. when the websocket drops (AWS recycles it about hourly) the session is resumed: ResumeSession
   for a new token, a new websocket, and every unacknowledged message resent;
6. ``close`` sends the TerminateSession flag and calls TerminateSession, whatever happened before.

Resuming is the only retry loop here and it is bounded (``resume_delays``); when it gives up,
the channel ends with a ``TransientError`` and its owner decides what to do.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, cast

from ...core.errors import ClosedError, DbtunneldError, ProtocolError, TransientError
from . import message as m
from . import netpath
from .api import Grant, redact_url
from .channel_flow import SequencedFlow
from .channel_handshake import AgentHandshake, Handshake
from .channel_options import ChannelOptions, SessionService
from .encryption import ENCRYPTED_INCOMING
from .reliability import OutgoingWindow, ReorderBuffer
from .wsclient import WsClient

log = logging.getLogger(__name__)

Sink = Callable[[bytes], Awaitable[None]]


class DataChannel(SequencedFlow):
    """The client side of one session's data channel. Create, ``await start()``, use, ``await close()``."""

    def __init__(
        self,
        grant: Grant,
        service: SessionService,
        *,
        options: ChannelOptions | None = None,
        clock: Callable[[], float] = time.monotonic,
        connect: Callable[..., Awaitable[Any]] | None = None,
        target: str = "",
    ) -> None:
        self.session_id = grant.session_id
        self.target = target
        self.on_connect_error: Callable[[], None] | None = None  # called on the loop at ConnectToPortError
        self.options = opts = options or ChannelOptions()
        self._grant = grant
        self._service = service
        self._clock = clock
        self._connect_ws = connect or _websocket_connect
        self._client_id = str(uuid.uuid4())
        self._label = f"[ssm session={grant.session_id}]"
        self._sink: Sink | None = None
        self._sink_set = asyncio.Event()
        self._ws: WsClient | None = None
        self._out = OutgoingWindow(span=opts.window)
        self._in: ReorderBuffer[m.AgentMessage] = ReorderBuffer(opts.reorder_capacity)
        self._next_seq = 0
        self._paused = False
        self._paused_at = 0.0
        self._last_received = self._last_progress = clock()
        self._in_sink = False
        self._changed = asyncio.Event()
        self._resend_wakeup = asyncio.Event()
        self._agent = AgentHandshake(grant.session_id, target, opts.client_version, service.generate_data_key,
                                     self._send_stream, self._finish, self._label)
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False
        self._ended_by_service = ""
        self._terminated = False
        self._finishing = False
        self.closed = asyncio.Event()
        self.error: DbtunneldError | None = None
        self.stats = {"sent": 0, "received": 0, "resent": 0, "resumes": 0, "buffered": 0, "duplicate": 0, "overflow": 0}

    def set_sink(self, sink: Sink) -> None:
        """Where output payloads go, in order (awaited: a slow sink slows the channel down).
        Output that arrives before (the agent may send it with its HandshakeComplete) waits for it."""
        self._sink = sink
        self._sink_set.set()

    def counters(self) -> dict[str, int]:
        return {**self.stats, "timeouts": self._out.timeouts, "unacknowledged": len(self._out), "held": len(self._in)}

    @property
    def handshake(self) -> Handshake:
        return self._agent.info

    @property
    def is_open(self) -> bool:
        return not self._closing and not self.closed.is_set()

    async def start(self) -> Handshake:
        """Connect and complete the agent's handshake; raises (and closes) on failure."""
        try:
            await self._connect(self._grant)
            self._tasks.append(asyncio.ensure_future(self._run()))
            self._tasks.append(asyncio.ensure_future(self._resend_loop()))
            return await asyncio.wait_for(asyncio.shield(self._agent.completed), self.options.handshake_timeout)
        except asyncio.TimeoutError:
            error = TransientError(f"SSM session {self.session_id}: no handshake from the agent within {self.options.handshake_timeout:.0f} s")
            await self._finish(error)
            raise error from None
        except DbtunneldError as exc:
            await self._finish(exc)
            raise

    async def send(self, data: bytes, payload_type: int = m.OUTPUT) -> None:
        """Send bytes to the agent, split into messages; waits for window room / resume / unpause."""
        size = self.options.max_payload
        if len(data) <= size:
            await self._send_stream(payload_type, bytes(data))
            return
        view = memoryview(data)
        for offset in range(0, len(data), size):
            await self._send_stream(payload_type, bytes(view[offset : offset + size]))

    async def send_flag(self, flag: int) -> None:
        await self._send_stream(m.FLAG, m.flag_payload(flag))

    async def close(self) -> None:
        """Tell the agent and the service the session is over, then close the websocket. Idempotent."""
        if self._closing:
            await self.closed.wait()
            return
        self._closing = True
        self._wake()
        if self._ws is not None and self._agent.completed.done() and not self._ended_by_service:
            await self._send_terminate_flag()
        await self._finish(self.error)

    # --- connection ------------------------------------------------------------------------

    async def _connect(self, grant: Grant) -> None:
        loop = asyncio.get_running_loop()
        headers = await loop.run_in_executor(None, self._service.websocket_headers, grant.stream_url)
        log.debug("%s opening data channel %s", self._label, redact_url(grant.stream_url))
        try:
            ws = await self._connect_ws(grant.stream_url, headers, self.options)
            await ws.send(m.open_data_channel(grant.token, self._client_id, self.options.client_version))
        except (OSError, ValueError, asyncio.TimeoutError) as exc:
            where = f"{self._label} data channel {redact_url(grant.stream_url)}"
            raise netpath.dial_error(exc, where) or TransientError(f"{where}: {type(exc).__name__}: {exc}") from None
        except Exception as exc:  # HandshakeError, and websockets' InvalidHandshake family
            raise TransientError(f"{self._label} data channel {redact_url(grant.stream_url)}: {_describe(exc)}") from None
        self._ws = ws
        self._wake()

    async def _run(self) -> None:
        """Read until the channel ends; resume when the websocket drops underneath."""
        try:
            while True:
                await self._read_all(cast(WsClient, self._ws))  # None only after close() during a resume: the TypeError ends the run
                if self._closing or self._ended_by_service:
                    break
                if not self._agent.completed.done():
                    raise TransientError(f"{self._label} data channel closed before the handshake{_close_reason(self._ws)}")
                log.info("%s websocket closed%s; resuming the session", self._label, _close_reason(self._ws))
                await self._resume()
            error = None
            if self._ended_by_service and not self._closing:
                error = ClosedError(f"Session Manager ended SSM session {self.session_id}: {self._ended_by_service}",
                                    hint="a new session is needed (idle timeout, max session duration or a terminate)")
            await self._finish(error)
        except asyncio.CancelledError:
            raise
        except DbtunneldError as exc:
            await self._finish(exc)
        except Exception as exc:
            log.exception("%s data channel failed", self._label)
            await self._finish(TransientError(f"{self._label} data channel failed: {type(exc).__name__}: {exc}"))

    async def _read_all(self, ws: WsClient) -> None:
        async for raw in ws:
            if isinstance(raw, str):
                log.warning("%s text message from the service: %.200s", self._label, raw)
                continue
            await self._on_message(raw)
            if self._ended_by_service:
                return

    async def _resume(self) -> None:
        self._ws = None
        last: DbtunneldError | None = None
        loop = asyncio.get_running_loop()
        for delay in self.options.resume_delays:
            if self._closing:
                return
            if delay:
                log.warning("%s resume failed (%s); next attempt in %.1f s", self._label, last and last.message, delay)
                await asyncio.sleep(delay)
            try:
                grant = await loop.run_in_executor(None, self._service.resume_session, self.session_id)
                if grant is None:
                    raise ClosedError(f"SSM session {self.session_id} is over (terminated or timed out); it cannot be resumed")
                await self._connect(grant)
            except TransientError as exc:
                last = exc
                continue
            self.stats["resumes"] += 1
            await self._resend(self._out.resend_all(self._clock()))
            log.info("%s data channel resumed (%d unacknowledged messages resent)", self._label, len(self._out))
            return
        raise TransientError(f"SSM session {self.session_id}: could not resume the data channel: {last and last.message}", hint="check the network path to the SSM endpoints")

    async def _finish(self, error: DbtunneldError | None) -> None:
        """End the channel: TerminateSession (always), close the websocket, stop the tasks."""
        if self._finishing:
            await self.closed.wait()
            return
        self._finishing = self._closing = True
        if error is not None and self.error is None:
            self.error = error
            log.warning("%s data channel ended: %s", self._label, error.message)
        if not self._agent.completed.done():
            self._agent.completed.set_exception(self.error or ClosedError(f"SSM session {self.session_id} closed"))
            self._agent.completed.exception()  # mark retrieved
        await self._terminate()
        ws, self._ws = self._ws, None
        if ws is not None:
            try:
                await asyncio.wait_for(ws.close(), 2.0)
            except Exception:
                pass
        current = asyncio.current_task()
        for task in self._tasks:
            if task is not current:
                task.cancel()
        self.closed.set()
        self._wake()

    async def _terminate(self) -> None:
        if self._terminated:
            return
        self._terminated = True
        loop = asyncio.get_running_loop()
        try:
            call = loop.run_in_executor(None, self._service.terminate_session, self.session_id)
            await asyncio.wait_for(call, self.options.terminate_timeout)
        except Exception as exc:
            log.warning("%s TerminateSession failed: %s (the service ends it at its idle timeout)", self._label, _describe(exc))

    async def _send_terminate_flag(self) -> None:
        """Best effort: the agent stops the plugin at once instead of at the service's signal."""
        try:
            seq = self._next_seq
            await asyncio.wait_for(self._send_stream(m.FLAG, m.flag_payload(m.FLAG_TERMINATE_SESSION), force=True), 1.0)
            deadline = self._clock() + 1.0
            while seq in self._out and self._clock() < deadline and self._ws is not None:
                self._changed.clear()
                await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - self._clock()))
        except (asyncio.TimeoutError, DbtunneldError):
            pass

    # --- receiving -------------------------------------------------------------------------

    async def _on_message(self, raw: bytes) -> None:
        try:
            msg = m.decode(raw)
        except ProtocolError as exc:
            log.warning("%s dropped a corrupt message: %s", self._label, exc.message)
            return
        kind = msg.message_type
        self._last_received = self._clock()
        if kind in (m.OUTPUT_STREAM, m.ACKNOWLEDGE) and self._paused:
            self._set_paused(False)  # soft pause: any acknowledgement or stream message lifts it
        if kind == m.OUTPUT_STREAM:
            await self._on_stream(msg)
        elif kind == m.ACKNOWLEDGE:
            await self._on_ack(msg)
        elif kind == m.CHANNEL_CLOSED:
            self._on_channel_closed(msg)
        elif kind == m.PAUSE_PUBLICATION:
            self._set_paused(True)
        elif kind == m.START_PUBLICATION:
            self._set_paused(False)
        else:
            log.debug("%s ignored message type %s", self._label, kind)

    def _on_channel_closed(self, msg: m.AgentMessage) -> None:
        try:
            output = str(m.json_payload(msg).get("Output") or "")
        except ProtocolError:
            output = ""
        self._ended_by_service = output or "channel closed"
        log.info("%s the service closed the channel: %s", self._label, self._ended_by_service)

    async def _dispatch(self, msg: m.AgentMessage) -> None:
        ptype = msg.payload_type
        payload = msg.payload
        if self._agent.cipher is not None and ptype in ENCRYPTED_INCOMING:
            try:
                payload = self._agent.cipher.decrypt(payload)
            except ProtocolError as exc:
                await self._finish(ProtocolError(f"SSM session {self.session_id}: {exc.message}"))
                return
        if ptype in (m.OUTPUT, m.STDERR):
            self._in_sink = True
            try:
                await self._sink_set.wait()     # dropping it instead lost sshd's banner now and then
                await cast(Sink, self._sink)(payload)
            finally:
                self._in_sink = False
        elif ptype == m.HANDSHAKE_REQUEST:
            await self._agent.on_request(msg)
        elif ptype == m.HANDSHAKE_COMPLETE:
            self._agent.on_complete(msg)
        elif ptype == m.FLAG:
            self._on_flag(msg)
        elif ptype == m.ENC_CHALLENGE_REQUEST:
            await self._agent.on_encryption_challenge(msg)
        else:
            log.debug("%s ignored payload type %d", self._label, ptype)

    def _on_flag(self, msg: m.AgentMessage) -> None:
        try:
            flag = m.parse_flag(msg.payload)
        except ProtocolError:
            return
        if flag == m.FLAG_CONNECT_TO_PORT_ERROR:
            log.warning("%s the agent could not connect to the destination port", self._label)
            if self.on_connect_error is not None:
                self.on_connect_error()


def _close_reason(ws: WsClient | None) -> str:
    if ws is None or ws.close_code is None:
        return ""
    return f" (websocket close {ws.close_code}: {ws.close_reason})"


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


async def _websocket_connect(url: str, headers: dict[str, str], options: ChannelOptions) -> WsClient:
    return await WsClient.connect(url, headers, open_timeout=options.open_timeout, max_size=options.max_message, ping_interval=options.ping_interval,
                                  ca_bundle=options.ca_bundle)
