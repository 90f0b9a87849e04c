"""The agent side of an SSM data channel, for the SSM stand-in (its own framing: ``ssm_wire``).

Written from aws/amazon-ssm-agent ``agent/session/datachannel/datachannel.go`` (function names
below) and ``agent/session/config/config.go``; the port plugin is in ``ssm_agent_port``.

* Handshake (``PerformHandshake``): HandshakeRequest with the requested client actions
  (``buildHandshakeRequestPayload``: ``SessionType`` first; more actions such as KMSEncryption
  plug in through ``AgentSession.actions``), then wait for the HandshakeResponse (15 s). In
  ``handleHandshakeResponse`` any ProcessedClientAction whose ActionStatus is not 1 (Success)
  cancels the session; a successful action is finalised by its handler. Then
  HandshakeComplete, then the plugin.
* Sending (``SendStreamDataMessage``): sequence numbers from 0, SYN on the first; every
  message is kept until acknowledged. No window: the agent never waits for acknowledgements.
* Resending (``ResendStreamDataMessageScheduler``, ``realistic`` mode): every
  ``ResendSleepInterval`` (100 ms) only the *oldest* unacknowledged message, and only when
  its last send is older than the retransmission timeout (``calculateRetransmissionTimeout``:
  200 ms at first, then RTT + max(10 ms, 4 RTTVAR), at most 1 s). ``fast`` mode resends every
  expired message every 10 ms, for tests of the client's own throughput.
* Receiving (``handleStreamDataMessage``): the expected message is processed, *then*
  acknowledged; a handler that is not ready (port not connected yet: ``ErrHandlerNotReady``)
  leaves it unacknowledged. Later ones are acknowledged and held; earlier ones acknowledged
  again. Any stream message or acknowledgement clears a pause (``Pause = false``).
* The session outlives websockets. Messages sent while the client's websocket was down are
  lost at the service and come back only through the scheduler (realistic mode: ~10 a second);
  fast mode resends every unacknowledged message to a resumed client at once.

Fault knobs (``Faults``: drops, delays, jitter, websocket closes) act on the wire; the service
preferences (``idle_timeout``, ``max_session_duration``) are enforced by ``ssm_standin``.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields
from typing import Any, Protocol

from . import ssm_wire as w
from .ssm_agent_buffer import OutgoingBuffer
from .ssm_agent_port import REALISTIC, Destination, MuxRelay, PortPlugin, StreamRelay, fast_pacing
from .ssm_http import WsConnection

log = logging.getLogger(__name__)

DEFAULT_AGENT_VERSION = "3.3.1142.0"
MUX_CLIENT_VERSION = "1.1.70"
KEEPALIVE_OFF_ABOVE = "1.2.331.0"
HANDSHAKE_TIMEOUT = 15.0
RESEND_INTERVAL = 0.1  # ResendSleepInterval
FAST_RESEND_INTERVAL = 0.01
INCOMING_CAPACITY = 100_000
DRAIN_TIMEOUT = 5.0  # PrepareToCloseChannel waits 2 s; fault knobs can make the tail slower
MODES = ("realistic", "fast")


@dataclass
class Faults:
    """Live knobs read by every session: wire faults, the mode, the service's preferences."""

    drop: float = 0.0  # fraction of data-channel messages lost, each direction
    delay_ms: float = 0.0  # added to every message towards the client
    jitter_ms: float = 0.0  # random extra delay per message (reorders them)
    close_after_messages: int = 0  # close the client's websocket after N messages to it (once)
    agent_payload: int = 1024  # fast mode: bytes per output message (realistic: always 1024)
    seed: int | None = None
    mode: str = "realistic"  # taken by each session when it starts
    idle_timeout: float = 1200.0  # Session Manager preference: 20 min by default (1-60 min); seconds here
    max_session_duration: float = 0.0  # Session Manager preference; 0 = none

    def update(self, changes: dict[str, Any]) -> None:
        known = {f.name for f in fields(self)}
        for key, value in changes.items():
            if key not in known:
                raise ValueError(f"unknown fault {key!r} (known: {', '.join(sorted(known))})")
            if key == "seed":
                self.seed = None if value is None else int(value)
            elif key == "mode":
                self.mode = str(value)
            elif key in ("close_after_messages", "agent_payload"):
                setattr(self, key, int(value))
            else:
                setattr(self, key, float(value))
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")
        if not 0.0 <= self.drop < 1.0:
            raise ValueError("drop must be in [0, 1)")
        if not 1 <= self.agent_payload <= 1 << 20:
            raise ValueError("agent_payload must be 1..1048576")
        if self.idle_timeout <= 0 or self.max_session_duration < 0:
            raise ValueError("idle_timeout must be > 0 s and max_session_duration >= 0 s (0: no limit)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def version_tuple(version: str) -> tuple[int, ...]:
    return tuple(int("".join(c for c in part if c.isdigit()) or 0) for part in version.split("."))


class HandshakeAction(Protocol):
    """One RequestedClientAction: what goes in the request, and what to do with a successful result.
    An action may also define ``async confirm(session)``, awaited after every action is finalised
    and before HandshakeComplete (the KMS encryption challenge goes there); raising ValueError
    from ``finalize`` or ``confirm`` cancels the session."""

    action_type: str

    def parameters(self) -> Any: ...

    def finalize(self, result: Any) -> None: ...


class PayloadCipher(Protocol):
    """Set as ``AgentSession.cipher`` once a session is encrypted (datachannel.go encrypts
    Output payloads it sends and decrypts those it receives)."""

    def encrypt(self, payload: bytes) -> bytes: ...

    def decrypt(self, payload: bytes) -> bytes: ...


@dataclass
class SessionTypeAction:
    plugin: PortPlugin
    action_type: str = "SessionType"

    def parameters(self) -> Any:
        return {"SessionType": "Port", "Properties": self.plugin.properties}

    def finalize(self, result: Any) -> None:
        return None


class HandshakeFailed(Exception):
    pass


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
    ) -> None:
        self.session_id = session_id
        self.plugin = plugin
        self.faults = faults
        self.mode = faults.mode
        self.agent_version = agent_version
        self.client_version = ""
        self.actions: list[HandshakeAction] = [SessionTypeAction(plugin)]  # seam: more client actions (KMS)
        self.cipher: PayloadCipher | None = None  # seam: set by an encryption action
        self.payload_handlers: dict[int, Callable[[w.Message], Awaitable[None]]] = {}  # other payload types
        self.started = self.last_data = time.monotonic()
        self._on_end = on_end
        self._on_state = on_state or (lambda state: None)
        self._rng = rng or random.Random(faults.seed)
        self._out = OutgoingBuffer()
        self._held: dict[int, w.Message] = {}
        self._expected = 0
        self._next_seq = 0
        self._conn: WsConnection | None = None
        self._response: asyncio.Future[w.Message] | None = None
        self._relay: StreamRelay | MuxRelay | None = None
        self._tasks: list[asyncio.Task] = []
        self._ended = False
        self.frozen = False  # a black hole: the websocket stays open, nothing passes either way
        self._sent_to_client = 0
        self.stats = {"to_client": 0, "from_client": 0, "dropped": 0, "resent": 0, "refused": 0, "duplicates": 0}

    # --- websocket attachment (called by the stand-in) ----------------------------------------

    async def serve(self, conn: WsConnection) -> None:
        """Run one client websocket until it closes; the session survives it."""
        old, self._conn = self._conn, conn
        if old is not None:
            await old.close(1000, "superseded")
        self._on_state("Connected")
        if not self._tasks:
            self._response = asyncio.get_running_loop().create_future()
            self._tasks.append(asyncio.ensure_future(self._run_plugin()))
            self._tasks.append(asyncio.ensure_future(self._resend_loop()))
        elif self.mode == "fast":
            self._resend(self._out.everything(time.monotonic()))
        # realistic: nothing special on a new websocket; what the service dropped while the
        # client was away comes back through the oldest-only scheduler, ~10 messages a second
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

    async def pause(self, seconds: float | None) -> None:
        """pause_publication to the client; start_publication ``seconds`` later (None: never)."""
        self._control(w.PAUSE_PUBLICATION)
        if seconds is None:
            return
        await asyncio.sleep(seconds)
        self._control(w.START_PUBLICATION)

    async def end(self, reason: str) -> None:
        """Service-side end: channel_closed to the client, websocket closed, port plugin stopped."""
        if self._ended:
            return
        self._ended = True
        log.info("stand-in agent [session=%s] ending: %s", self.session_id, reason)
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.send_nowait(w.pack(w.channel_closed(self.session_id, reason)))
            await conn.close(1000, "session terminated")
        if self._relay is not None:
            await self._relay.close()
        for task in self._tasks:
            if task is not asyncio.current_task():
                task.cancel()

    # --- sending ------------------------------------------------------------------------------

    async def send_stream(self, payload_type: int, payload: bytes) -> None:
        """One agent message (the port plugin decides the sizes: ``ssm_agent_port.Pacing``)."""
        await self._send_one(payload_type, payload)

    async def _send_one(self, payload_type: int, payload: bytes) -> None:
        if self._ended:
            return
        conn = self._conn
        if conn is not None:
            await conn.wait_writable()
        if self.cipher is not None and payload_type == w.OUTPUT:
            payload = self.cipher.encrypt(payload)
        seq = self._next_seq
        self._next_seq += 1
        raw = w.pack(w.stream_message(seq, payload_type, payload))
        self._out.add(seq, raw, time.monotonic())
        self.last_data = time.monotonic()
        self._transmit(raw)

    def _control(self, kind: str) -> None:
        conn = self._conn
        if conn is not None:
            conn.send_nowait(w.pack(w.control(kind)))

    def _transmit(self, raw: bytes) -> None:
        """One attempt to put a message on the client's websocket, through the fault knobs."""
        conn = self._conn
        if conn is None or self.frozen:
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

    def _resend(self, messages: list[bytes]) -> None:
        self.stats["resent"] += len(messages)
        for raw in messages:
            self._transmit(raw)

    async def _resend_loop(self) -> None:
        realistic = self.mode == "realistic"
        while not self._ended:
            await asyncio.sleep(RESEND_INTERVAL if realistic else FAST_RESEND_INTERVAL)
            if self._conn is None:
                continue
            now = time.monotonic()
            self._resend(self._out.oldest_due(now) if realistic else self._out.all_due(now))

    # --- receiving ----------------------------------------------------------------------------

    async def _on_client_message(self, raw: bytes) -> None:
        if self.frozen:
            return
        if self.faults.drop and self._rng.random() < self.faults.drop:
            self.stats["dropped"] += 1
            return
        try:
            msg = w.unpack(raw)
            if msg.kind == w.INPUT_STREAM:
                await self._on_input(msg)
            elif msg.kind == w.ACKNOWLEDGE:
                self._out.ack(w.acknowledged_seq(msg), time.monotonic())
        except w.WireError as exc:
            log.warning("stand-in agent [session=%s] bad message: %s", self.session_id, exc)

    async def _on_input(self, msg: w.Message) -> None:
        self.last_data = time.monotonic()
        if msg.seq == self._expected:
            if not await self._process(msg):
                self.stats["refused"] += 1
                return  # ErrHandlerNotReady: no acknowledgement, the client resends
            self._ack(msg)
            self._expected += 1
            while self._expected in self._held:
                held = self._held.pop(self._expected)
                if not await self._process(held):
                    self._held[self._expected] = held
                    return
                self._expected += 1
        elif msg.seq > self._expected:
            if len(self._held) < INCOMING_CAPACITY:
                self._ack(msg)
                self._held.setdefault(msg.seq, msg)
        else:
            self.stats["duplicates"] += 1
            self._ack(msg)

    def _ack(self, msg: w.Message) -> None:
        self._transmit(w.pack(w.acknowledgement(msg)))

    async def _process(self, msg: w.Message) -> bool:
        """processStreamDataMessage; False when the port is not connected yet."""
        if msg.payload_type == w.HANDSHAKE_RESPONSE:
            if self._response is not None and not self._response.done():
                self._response.set_result(msg)
        elif msg.payload_type == w.OUTPUT:
            if self._relay is None:
                return False
            await self._relay.write(self.cipher.decrypt(msg.payload) if self.cipher is not None else msg.payload)
        elif msg.payload_type == w.FLAG:
            await self._on_flag(w.read_flag(msg.payload))
        elif msg.payload_type in self.payload_handlers:
            await self.payload_handlers[msg.payload_type](msg)
        self.stats["from_client"] += 1
        return True

    async def _on_flag(self, flag: int) -> None:
        if flag == w.FLAG_TERMINATE_SESSION:
            asyncio.ensure_future(self._finish("the client ended the session"))
        elif flag == w.FLAG_DISCONNECT_TO_PORT and isinstance(self._relay, StreamRelay):
            await self._relay.close()

    # --- handshake and the port plugin --------------------------------------------------------

    async def _run_plugin(self) -> None:
        started = time.monotonic()
        try:
            await self._handshake()
        except HandshakeFailed as exc:
            await self._finish(str(exc))
            return
        took_ns = int((time.monotonic() - started) * 1e9)
        message = "This session is encrypted using AWS KMS." if self.cipher is not None else ""  # buildHandshakeCompletePayload
        await self.send_stream(w.HANDSHAKE_COMPLETE, w.json_payload({"HandshakeTimeToComplete": took_ns, "CustomerMessage": message}))
        destination = Destination(self.plugin)
        relay = self._make_relay(destination)
        try:
            await relay.start()
        except OSError as exc:
            await self._finish(f"Unable to connect to specified port: {exc}")
            return
        self._relay = relay  # IsConnectionAvailable: input is refused (not acknowledged) until now
        reason = await relay.run()
        await self._drain_outgoing(DRAIN_TIMEOUT)
        await self._finish(reason)

    async def _handshake(self) -> None:
        request = {"AgentVersion": self.agent_version, "RequestedClientActions": [{"ActionType": a.action_type, "ActionParameters": a.parameters()} for a in self.actions]}
        await self.send_stream(w.HANDSHAKE_REQUEST, w.json_payload(request))
        assert self._response is not None
        try:
            reply = await asyncio.wait_for(asyncio.shield(self._response), HANDSHAKE_TIMEOUT)
            response = reply.json()
        except asyncio.TimeoutError:
            raise HandshakeFailed("Handshake timed out. Please ensure that you have the latest version of the session manager plugin.") from None
        except w.WireError as exc:
            raise HandshakeFailed(f"Unmarshalling of HandshakeResponse message failed, {exc}") from None
        self.client_version = str(response.get("ClientVersion") or "")
        log.info("stand-in agent [session=%s] client version %s", self.session_id, self.client_version)
        self._check_actions(response.get("ProcessedClientActions") or [])
        for action in self.actions:
            confirm = getattr(action, "confirm", None)
            if confirm is not None:
                try:
                    await confirm(self)
                except ValueError as exc:
                    raise HandshakeFailed(f"{action.action_type}: {exc}") from None

    def _check_actions(self, processed: list[dict[str, Any]]) -> None:
        handlers = {action.action_type: action for action in self.actions}
        for item in processed:
            kind, status = item.get("ActionType"), item.get("ActionStatus")
            if status != w.ACTION_SUCCESS:
                raise HandshakeFailed(f"{kind} failed on client with status {status} error: {item.get('Error') or ''}")
            handler = handlers.get(str(kind))
            if handler is None:
                log.warning("stand-in agent [session=%s] unknown handshake client action %s", self.session_id, kind)
                continue
            try:
                handler.finalize(item.get("ActionResult"))
            except ValueError as exc:
                raise HandshakeFailed(f"{kind}: {exc}") from None

    async def _drain_outgoing(self, timeout: float) -> None:
        """Before ending, give the client time to acknowledge what is in flight (PrepareToCloseChannel)."""
        deadline = time.monotonic() + timeout
        while len(self._out) and time.monotonic() < deadline and not self._ended:
            await asyncio.sleep(0.01)

    def _make_relay(self, destination: Destination) -> StreamRelay | MuxRelay:
        pacing = REALISTIC if self.mode == "realistic" else fast_pacing(self.faults.agent_payload)
        client = version_tuple(self.client_version)
        if self.plugin.multiplexed and client >= version_tuple(MUX_CLIENT_VERSION):
            return MuxRelay(destination, self.send_stream, pacing, keepalive=client <= version_tuple(KEEPALIVE_OFF_ABOVE))
        return StreamRelay(destination, self.send_stream, pacing)

    async def _finish(self, reason: str) -> None:
        if self._on_end is not None:
            await self._on_end(reason)
        else:
            await self.end(reason)
