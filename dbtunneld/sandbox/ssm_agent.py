"""The agent side of an SSM data channel, for the SSM stand-in.

What the real SSM agent does for a ``Port`` session, on loopback: send the HandshakeRequest
(session type ``Port`` and the document's properties), wait for the client's HandshakeResponse
(its ``ClientVersion`` decides smux and smux keepalive), send HandshakeComplete, then run the
port plugin:

* ``AWS-StartSSHSession`` (no ``type``): one TCP connection to the target's sshd, relayed as a
  plain byte stream; when sshd closes it, the session ends;
* ``AWS-StartPortForwardingSessionToRemoteHost`` (``type: LocalPortForwarding``): an smux v1
  server; each client stream dials ``host:port``, a failed dial is answered with the
  ConnectToPortError flag. Clients at or below 1.2.331.0 get smux keepalive, and their idle
  sessions are dropped after 30 s, as the agent does.

Like the agent it acknowledges every input message it accepts, re-acknowledges duplicates,
buffers early arrivals, refuses (does not acknowledge) data that arrives before its port
connection is up, and keeps what it sends until acknowledged. Unlike the agent (which resends
only its oldest message every 100 ms) each message is resent on its own deadline, so the fault
knobs (drops, delays, websocket closes) cost seconds, not minutes. The session outlives its
websockets: a resumed client gets every unacknowledged message again.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any

from ..errors import ProtocolError
from ..ssm import message as m
from ..ssm import smux
from ..ssm.reliability import OutgoingWindow, ReorderBuffer, Verdict
from ..ssm.session import version_tuple
from .ssm_http import WsConnection
from .ssm_kms import RECEIVED_ENCRYPTED, SENT_ENCRYPTED, AgentCipher, KmsHandshakeError

log = logging.getLogger(__name__)

DEFAULT_AGENT_VERSION = "3.3.1142.0"
MUX_CLIENT_VERSION = "1.1.70"
KEEPALIVE_OFF_ABOVE = "1.2.331.0"
HANDSHAKE_TIMEOUT = 15.0
READ_SIZE = 256 * 1024
WRITE_HIGH_WATER = 4 << 20
SMUX_KEEPALIVE_TIMEOUT = 30.0
DRAIN_TIMEOUT = 5.0  # the agent allows 2 s; fault knobs can make the tail slower


@dataclass
class Faults:
    """Fault knobs, read live by every session (settable at start and through the control API)."""

    drop: float = 0.0  # fraction of data-channel messages lost, each direction
    delay_ms: float = 0.0  # added to every message towards the client
    jitter_ms: float = 0.0  # random extra delay per message (reorders them)
    close_after_messages: int = 0  # close the client's websocket after N messages to it (once)
    agent_payload: int = 1024  # bytes per output message (the real agent sends 1024)
    seed: int | None = None

    def update(self, changes: dict[str, Any]) -> None:
        known = {f.name: f for f in fields(self)}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown fault {key!r} (known: {', '.join(known)})")
            if key == "seed":
                setattr(self, key, None if value is None else int(value))
            elif key in ("close_after_messages", "agent_payload"):
                setattr(self, key, int(value))
            else:
                setattr(self, key, float(value))
        if not 0.0 <= self.drop < 1.0:
            raise ValueError("drop must be in [0, 1)")
        if not 1 <= self.agent_payload <= 1 << 20:
            raise ValueError("agent_payload must be 1..1048576")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class PortPlugin:
    """What the session's document asks the agent to run."""

    properties: dict[str, str]
    host: str
    port: int

    @property
    def multiplexed(self) -> bool:
        return self.properties.get("type") == "LocalPortForwarding"


class AgentSession:
    """The agent's side of one session. The stand-in attaches client websockets to it."""

    def __init__(
        self,
        session_id: str,
        plugin: PortPlugin,
        faults: Faults,
        *,
        agent_version: str = DEFAULT_AGENT_VERSION,
        on_end: Callable[[str], Awaitable[None]] | None = None,
        on_state: Callable[[str], None] | None = None,
        rng: random.Random | None = None,
        cipher: AgentCipher | None = None,
    ) -> None:
        self.session_id = session_id
        self.cipher = cipher  # KMS encryption (the account's Session Manager preference), or None
        self._handshake_payload: dict[str, Any] = {}
        self._challenge_answer: asyncio.Future[bytes] | None = None
        self.plugin = plugin
        self.faults = faults
        self.agent_version = agent_version
        self.client_version = ""
        self._on_end = on_end
        self._on_state = on_state or (lambda state: None)
        self._rng = rng or random.Random(faults.seed)
        self._out = OutgoingWindow(span=1024)
        self._in: ReorderBuffer[m.AgentMessage] = ReorderBuffer()
        self._next_seq = 0
        self._conn: WsConnection | None = None
        self._paused = False
        self._changed = asyncio.Event()
        self._handshake_response = asyncio.Event()
        self._relay: _StreamRelay | _MuxRelay | None = None
        self._ready = False
        self._tasks: list[asyncio.Task] = []
        self._ended = False
        self._sent_to_client = 0
        self.stats = {"to_client": 0, "from_client": 0, "dropped": 0, "resent": 0, "refused": 0, "duplicates": 0}

    # --- websocket attachment (called by the stand-in) ----------------------------------------

    async def serve(self, conn: WsConnection) -> None:
        """Run one client websocket until it closes; the session survives it."""
        old, self._conn = self._conn, conn
        if old is not None:
            await old.close(1000, "superseded")
        self._on_state("Connected")
        self._wake()
        if not self._tasks:
            self._tasks.append(asyncio.ensure_future(self._run_plugin()))
            self._tasks.append(asyncio.ensure_future(self._resend_loop()))
        else:
            self._resend(self._out.resend_all(time.monotonic()))
        try:
            async for raw in conn:
                if isinstance(raw, bytes):
                    await self._on_client_message(raw)
        finally:
            if self._conn is conn:
                self._conn = None
                if not self._ended:
                    self._on_state("Disconnected")

    async def close_websocket(self, mode: str = "close") -> bool:
        conn = self._conn
        if conn is None:
            return False
        if mode == "abort":
            conn.abort()
        else:
            await conn.close(1000, "Bye")
        return True

    async def pause(self, seconds: float) -> None:
        """pause_publication to the client, silence, then start_publication (agent went away)."""
        self._paused = True
        self._transmit(m.encode(m.control_message(m.PAUSE_PUBLICATION)), control=True)
        await asyncio.sleep(seconds)
        self._paused = False
        self._transmit(m.encode(m.control_message(m.START_PUBLICATION)), control=True)
        self._resend(self._out.resend_all(time.monotonic()))
        self._wake()

    async def end(self, reason: str) -> None:
        """Service-side end: channel_closed to the client, websocket closed, port plugin stopped."""
        if self._ended:
            return
        self._ended = True
        log.info("stand-in agent [session=%s] ending: %s", self.session_id, reason)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.send_nowait(m.encode(m.control_message(m.CHANNEL_CLOSED, m.channel_closed(self.session_id, reason))))
            await conn.close(1000, "session terminated")
        if self._relay is not None:
            await self._relay.close()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()
        self._wake()

    # --- sending ------------------------------------------------------------------------------

    async def send_stream(self, payload_type: int, data: bytes) -> None:
        size = max(1, self.faults.agent_payload)
        for offset in range(0, len(data), size) if data else ():
            await self._send_one(payload_type, data[offset : offset + size])

    async def _send_one(self, payload_type: int, payload: bytes) -> None:
        while not self._out.has_room(self._next_seq):
            if self._ended:
                return
            self._changed.clear()
            await self._changed.wait()
        if self._ended:
            return
        if self.cipher is not None and self.cipher.ready and payload_type in SENT_ENCRYPTED:
            payload = self.cipher.seal(payload)
        seq = self._next_seq
        self._next_seq += 1
        raw = m.encode(m.stream_message(m.OUTPUT_STREAM, seq, payload_type, payload, syn_on_zero=True))
        self._out.add(seq, raw, time.monotonic())
        self._transmit(raw)

    def _transmit(self, raw: bytes, *, control: bool = False) -> None:
        """One attempt to put a message on the client's websocket, through the fault knobs."""
        conn = self._conn
        if conn is None or (self._paused and not control):
            return
        faults = self.faults
        if faults.drop and self._rng.random() < faults.drop:
            self.stats["dropped"] += 1
            return
        delay = (faults.delay_ms + (self._rng.random() * faults.jitter_ms if faults.jitter_ms else 0.0)) / 1000.0
        if delay > 0:
            asyncio.get_running_loop().call_later(delay, self._write, conn, raw)
        else:
            self._write(conn, raw)

    def _write(self, conn: WsConnection, raw: bytes) -> None:
        if conn is not self._conn or not conn.send_nowait(raw):
            return
        self.stats["to_client"] += 1
        limit = self.faults.close_after_messages
        if limit:
            self._sent_to_client += 1
            if self._sent_to_client >= limit:
                self.faults.close_after_messages = 0
                self._sent_to_client = 0
                log.info("stand-in agent [session=%s] fault: closing the websocket after %d messages", self.session_id, limit)
                asyncio.ensure_future(conn.close(1000, "Bye"))

    def _resend(self, messages: list[tuple[int, bytes]]) -> None:
        self.stats["resent"] += len(messages)
        for _seq, raw in messages:
            self._transmit(raw)

    async def _resend_loop(self) -> None:
        while not self._ended:
            if self._conn is not None and not self._paused:
                self._resend(self._out.due(time.monotonic()))
            deadline = self._out.next_deadline()
            wait = 0.05 if deadline is None else max(0.002, deadline - time.monotonic())
            await asyncio.sleep(max(wait, 0.05) if self._conn is None else min(wait, 0.05))

    def _wake(self) -> None:
        self._changed.set()

    # --- receiving ----------------------------------------------------------------------------

    async def _on_client_message(self, raw: bytes) -> None:
        if self.faults.drop and self._rng.random() < self.faults.drop:
            self.stats["dropped"] += 1
            return
        try:
            msg = m.decode(raw)
        except ProtocolError as exc:
            log.warning("stand-in agent [session=%s] corrupt message: %s", self.session_id, exc.message)
            return
        if msg.message_type == m.INPUT_STREAM:
            await self._on_input(msg)
        elif msg.message_type == m.ACKNOWLEDGE:
            now = time.monotonic()
            if self._out.ack(m.acknowledged_sequence(msg), now):
                self._wake()
                if not self._paused:
                    self._resend(self._out.lost(now))

    async def _on_input(self, msg: m.AgentMessage) -> None:
        if msg.sequence_number == self._in.expected and not self._accepts(msg):
            self.stats["refused"] += 1
            return  # like the agent: not ready, no acknowledgement, the client resends
        verdict, ready = self._in.offer(msg.sequence_number, msg)
        if verdict is Verdict.DUPLICATE:
            self.stats["duplicates"] += 1
        if verdict is not Verdict.OVERFLOW:
            self._transmit(m.encode(m.acknowledgement(msg)), control=True)
        for item in ready:
            self.stats["from_client"] += 1
            await self._process(item)

    def _accepts(self, msg: m.AgentMessage) -> bool:
        return msg.payload_type in (m.HANDSHAKE_RESPONSE, m.ENC_CHALLENGE_RESPONSE) or self._ready

    async def _process(self, msg: m.AgentMessage) -> None:
        if msg.payload_type == m.HANDSHAKE_RESPONSE:
            self._on_handshake_response(msg)
        elif msg.payload_type == m.ENC_CHALLENGE_RESPONSE:
            if self._challenge_answer is not None and not self._challenge_answer.done():
                self._challenge_answer.set_result(msg.payload)
        elif msg.payload_type == m.OUTPUT and self._relay is not None:
            payload = msg.payload
            if self.cipher is not None and self.cipher.ready and payload_type_encrypted(msg.payload_type):
                try:
                    payload = self.cipher.open(payload)
                except KmsHandshakeError as exc:
                    await self._finish(str(exc))
                    return
            await self._relay.write(payload)
        elif msg.payload_type == m.FLAG:
            await self._on_flag(m.parse_flag(msg.payload))

    def _on_handshake_response(self, msg: m.AgentMessage) -> None:
        response = m.json_payload(msg)
        self._handshake_payload = response
        self.client_version = str(response.get("ClientVersion") or "")
        log.info("stand-in agent [session=%s] client version %s", self.session_id, self.client_version)
        self._handshake_response.set()

    async def _on_flag(self, flag: int) -> None:
        if flag == m.FLAG_TERMINATE_SESSION:
            await self._finish("the client ended the session")
        elif flag == m.FLAG_DISCONNECT_TO_PORT and isinstance(self._relay, _StreamRelay):
            await self._relay.close()

    # --- the port plugin ----------------------------------------------------------------------

    async def _run_plugin(self) -> None:
        started = time.monotonic()
        request = m.handshake_request(self.agent_version, "Port", self.plugin.properties)
        if self.cipher is not None:
            payload = json.loads(request)
            payload["RequestedClientActions"].append(self.cipher.requested_action())
            request = json.dumps(payload).encode()
        await self.send_stream(m.HANDSHAKE_REQUEST, request)
        try:
            await asyncio.wait_for(self._handshake_response.wait(), HANDSHAKE_TIMEOUT)
        except asyncio.TimeoutError:
            await self._finish("Handshake timed out. Please ensure that you have the latest version of the session manager plugin.")
            return
        if self.cipher is not None:
            failure = await self._finish_kms_handshake()
            if failure:
                await self._finish(failure)
                return
        message = "This session is encrypted using AWS KMS." if self.cipher is not None else ""
        await self.send_stream(m.HANDSHAKE_COMPLETE, m.handshake_complete(time.monotonic() - started, message))
        self._relay = self._make_relay()
        try:
            await self._relay.start()
        except OSError as exc:
            await self._finish(f"Unable to connect to specified port: {exc}")
            return
        self._ready = True
        reason = await self._relay.run()
        await self._drain_outgoing(DRAIN_TIMEOUT)
        await self._finish(reason)

    async def _finish_kms_handshake(self) -> str:
        """finalizeKMSEncryption, then the encryption challenge; '' when it all checks out."""
        cipher = self.cipher
        assert cipher is not None
        actions = {a.get("ActionType"): a for a in self._handshake_payload.get("ProcessedClientActions") or []}
        action = actions.get("KMSEncryption")
        if action is None or action.get("ActionStatus") != 1:
            detail = action and f"status {action.get('ActionStatus')} error: {action.get('Error')}"
            return f"KMSEncryption failed on client with {detail or 'no answer'}"
        try:
            await cipher.finalize(action.get("ActionResult"))
            self._challenge_answer = asyncio.get_running_loop().create_future()
            await self.send_stream(m.ENC_CHALLENGE_REQUEST, cipher.challenge_request())
            answer = await asyncio.wait_for(self._challenge_answer, HANDSHAKE_TIMEOUT)
            cipher.check_challenge_response(answer)
        except KmsHandshakeError as exc:
            return str(exc)
        except asyncio.TimeoutError:
            return "Timed out waiting for encryption challenge."
        return ""

    async def _drain_outgoing(self, timeout: float) -> None:
        """Before ending, give the client time to acknowledge what is in flight (the agent waits 2 s)."""
        deadline = time.monotonic() + timeout
        while len(self._out) and time.monotonic() < deadline and not self._ended:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.01, deadline - time.monotonic()))
            except asyncio.TimeoutError:
                break

    def _make_relay(self) -> "_StreamRelay | _MuxRelay":
        if self.plugin.multiplexed and version_tuple(self.client_version) >= version_tuple(MUX_CLIENT_VERSION):
            keepalive = version_tuple(self.client_version) <= version_tuple(KEEPALIVE_OFF_ABOVE)
            return _MuxRelay(self, self.plugin.host, self.plugin.port, keepalive)
        return _StreamRelay(self, self.plugin.host, self.plugin.port)

    async def _finish(self, reason: str) -> None:
        if self._on_end is not None:
            await self._on_end(reason)
        else:
            await self.end(reason)


def payload_type_encrypted(payload_type: int) -> bool:
    return payload_type in RECEIVED_ENCRYPTED


async def _connect(host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port, limit=READ_SIZE)
    import socket

    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return reader, writer


class _StreamRelay:
    """One TCP connection relayed as the session's byte stream (SSH sessions)."""

    def __init__(self, agent: AgentSession, host: str, port: int) -> None:
        self._agent = agent
        self._host, self._port = host, port
        self._writer: asyncio.StreamWriter | None = None
        self._reader: asyncio.StreamReader | None = None

    async def start(self) -> None:
        self._reader, self._writer = await _connect(self._host, self._port)

    async def run(self) -> str:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(READ_SIZE)
                if not data:
                    break
                await self._agent.send_stream(m.OUTPUT, data)
        except (ConnectionError, OSError):
            pass
        return f"the connection to {self._host}:{self._port} closed"

    async def write(self, data: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        writer.write(data)
        if writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                pass

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class _MuxRelay:
    """The agent's smux server: one upstream connection per client stream."""

    def __init__(self, agent: AgentSession, host: str, port: int, keepalive: bool) -> None:
        self._agent = agent
        self._host, self._port = host, port
        self._keepalive = keepalive
        self._parser = smux.FrameParser()
        self._upstreams: dict[int, _Upstream] = {}
        self._outbox = bytearray()
        self._outbox_ready = asyncio.Event()
        self._done = asyncio.Event()
        self._reason = ""
        self._last_frame = time.monotonic()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._writer_loop()))
        if self._keepalive:
            self._tasks.append(asyncio.ensure_future(self._keepalive_loop()))

    async def run(self) -> str:
        await self._done.wait()
        return self._reason

    async def write(self, data: bytes) -> None:
        try:
            frames = self._parser.feed(data)
        except ProtocolError as exc:
            self._stop(f"smux: {exc.message}")
            return
        self._last_frame = time.monotonic()
        for frame in frames:
            await self._on_frame(frame)

    async def _on_frame(self, frame: smux.Frame) -> None:
        upstream = self._upstreams.get(frame.sid)
        if frame.cmd == smux.SYN and upstream is None:
            self._upstreams[frame.sid] = _Upstream(self, frame.sid)
        elif frame.cmd == smux.PSH and upstream is not None:
            await upstream.write(frame.data)
        elif frame.cmd == smux.FIN and upstream is not None:
            upstream.close()
            self._upstreams.pop(frame.sid, None)

    def enqueue(self, frame: bytes) -> None:
        self._outbox += frame
        self._outbox_ready.set()

    def connect_failed(self, sid: int, exc: OSError) -> None:
        log.warning("stand-in agent: stream %d: unable to dial %s:%d: %s", sid, self._host, self._port, exc)
        asyncio.ensure_future(self._agent.send_stream(m.FLAG, m.flag_payload(m.FLAG_CONNECT_TO_PORT_ERROR)))
        self.enqueue(smux.encode_frame(smux.FIN, sid))

    def forget(self, upstream: "_Upstream") -> None:
        if self._upstreams.get(upstream.sid) is upstream:
            del self._upstreams[upstream.sid]

    def address(self) -> tuple[str, int]:
        return self._host, self._port

    async def _writer_loop(self) -> None:
        while True:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                chunk = bytes(self._outbox)
                self._outbox.clear()
                await self._agent.send_stream(m.OUTPUT, chunk)

    async def _keepalive_loop(self) -> None:
        while not self._done.is_set():
            await asyncio.sleep(smux.KEEPALIVE_INTERVAL)
            self.enqueue(smux.encode_frame(smux.NOP, 0))
            if time.monotonic() - self._last_frame > SMUX_KEEPALIVE_TIMEOUT:
                self._stop("smux keepalive timeout (client version at or below 1.2.331.0)")

    def _stop(self, reason: str) -> None:
        self._reason = reason
        self._done.set()

    async def close(self) -> None:
        for upstream in list(self._upstreams.values()):
            upstream.close()
        self._upstreams.clear()
        for task in self._tasks:
            task.cancel()
        self._stop(self._reason or "closed")


class _Upstream:
    """One smux stream's connection to host:port."""

    def __init__(self, mux: _MuxRelay, sid: int) -> None:
        self._mux = mux
        self.sid = sid
        self._early: list[bytes] = []
        self._writer: asyncio.StreamWriter | None = None
        self._closed = False
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        host, port = self._mux.address()
        try:
            reader, self._writer = await _connect(host, port)
        except OSError as exc:
            self._mux.connect_failed(self.sid, exc)
            self._mux.forget(self)
            return
        if self._closed:
            self._writer.close()
            return
        for data in self._early:
            self._writer.write(data)
        self._early.clear()
        try:
            while True:
                data = await reader.read(smux.MAX_FRAME)
                if not data:
                    break
                self._mux.enqueue(smux.encode_frame(smux.PSH, self.sid, data))
        except (ConnectionError, OSError):
            pass
        if not self._closed:
            self._mux.enqueue(smux.encode_frame(smux.FIN, self.sid))
        self.close()
        self._mux.forget(self)

    async def write(self, data: bytes) -> None:
        if self._writer is None:
            self._early.append(data)
            return
        if self._writer.is_closing():
            return
        self._writer.write(data)
        if self._writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            try:
                await self._writer.drain()
            except (ConnectionError, OSError):
                pass

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        elif not self._task.done():
            self._task.cancel()
