"""The stand-in's own wire code: the agent message, its JSON payloads, and smux v1 frames.

Written from the agent's and smux's Go sources, deliberately *not* sharing a line with the
client's ``dbtunneld.adapters.ssm.message`` / ``dbtunneld.adapters.ssm.smux``, so that a mistake in the client's
framing shows up as a failure against the stand-in instead of being mirrored by it.

Agent message (aws/amazon-ssm-agent ``agent/session/contracts/agentmessage.go``,
``AgentMessage.Serialize`` / ``Deserialize`` and the ``AgentMessage_*Offset`` constants): big
endian; header length (4, holds 116 = the payload-length offset), message type (32 bytes, space
padded, trimmed of NULs and spaces on read: ``putString`` / ``getString``), schema version (4),
created date (8, epoch ms), sequence number (8, signed), flags (8), message id (16: the UUID's
low 8 bytes first, then the high 8: ``putUuid`` / ``getUuid``), SHA-256 of the payload (32),
payload type (4), payload length (4), payload. ``Validate`` wants a header length, a type and a
created date. Acknowledgements and control messages carry sequence 0 and flags 3
(``datachannel.go``: ``sendAgentMessage``); ``AcknowledgeContent`` is JSON
(``contracts/model.go``).

smux v1 (xtaci/smux v1.5.x ``frame.go``: ``rawHeader``; ``session.go``: ``recvLoop``): version
(1), command (1: SYN 0, FIN 1, PSH 2, NOP 3; UPD 4 is version 2 only), length (2, little
endian), stream id (4, little endian). ``recvLoop`` ends the whole session on a frame of
another version or an unknown command (``errInvalidProtocol``).
"""

from __future__ import annotations

import hashlib
import json
import struct
import time
import uuid
from dataclasses import dataclass
from typing import Any

# --- agent message ---------------------------------------------------------------------------

_LAYOUT = struct.Struct(">I32sIQqQ8s8s32sII")  # the low/high UUID halves as two 8-byte fields
HEADER_LENGTH = 116
PAYLOAD_START = 120

OUTPUT_STREAM = "output_stream_data"
INPUT_STREAM = "input_stream_data"
ACKNOWLEDGE = "acknowledge"
CHANNEL_CLOSED = "channel_closed"
PAUSE_PUBLICATION = "pause_publication"
START_PUBLICATION = "start_publication"

OUTPUT, HANDSHAKE_REQUEST, HANDSHAKE_RESPONSE, HANDSHAKE_COMPLETE, FLAG = 1, 5, 6, 7, 10
FLAG_DISCONNECT_TO_PORT, FLAG_TERMINATE_SESSION, FLAG_CONNECT_TO_PORT_ERROR = 1, 2, 3
ACTION_SUCCESS = 1  # contracts/model.go: ActionStatus Success 1, Failed 2, Unsupported 3


class WireError(ValueError):
    """A message or frame the real agent would reject."""


@dataclass
class Message:
    kind: str
    seq: int = 0
    flags: int = 0
    payload_type: int = 0
    payload: bytes = b""
    message_id: uuid.UUID | None = None
    created_ms: int = 0

    def json(self) -> Any:
        try:
            return json.loads(self.payload)
        except ValueError as exc:
            raise WireError(f"{self.kind} payload is not JSON: {exc}") from None


def pack(msg: Message) -> bytes:
    ident = (msg.message_id or uuid.uuid4()).bytes
    created = msg.created_ms or int(time.time() * 1000)
    kind = msg.kind.encode().ljust(32, b" ")
    digest = hashlib.sha256(msg.payload).digest()
    head = _LAYOUT.pack(HEADER_LENGTH, kind, 1, created, msg.seq, msg.flags, ident[8:], ident[:8], digest, msg.payload_type, len(msg.payload))
    return head + msg.payload


def unpack(raw: bytes) -> Message:
    if len(raw) < PAYLOAD_START:
        raise WireError(f"message of {len(raw)} bytes is shorter than the {PAYLOAD_START}-byte header")
    hl, kind, _schema, created, seq, flags, low, high, digest, ptype, plen = _LAYOUT.unpack_from(raw)
    if hl == 0:
        raise WireError("HeaderLength cannot be zero")
    payload = raw[hl + 4 :]
    name = kind.strip(b"\x00").decode("utf-8", "replace").strip()
    if not name:
        raise WireError("MessageType is missing")
    if created == 0:
        raise WireError("CreatedDate is missing")
    if name in (INPUT_STREAM, OUTPUT_STREAM) and (len(payload) != plen or hashlib.sha256(payload).digest() != digest):
        raise WireError(f"{name} {seq}: payload length or digest does not match")
    return Message(name, seq, flags, ptype, payload, uuid.UUID(bytes=high + low), created)


def stream_message(seq: int, payload_type: int, payload: bytes) -> Message:
    """An agent output message; the first of the stream has SYN (datachannel.go: SendStreamDataMessage)."""
    return Message(OUTPUT_STREAM, seq, 1 if seq == 0 else 0, payload_type, payload)


def json_message(kind: str, content: dict[str, Any]) -> Message:
    return Message(kind, 0, 3, 0, json.dumps(content).encode())


def acknowledgement(of: Message) -> Message:
    return json_message(ACKNOWLEDGE, {
        "AcknowledgedMessageType": of.kind,
        "AcknowledgedMessageId": str(of.message_id),
        "AcknowledgedMessageSequenceNumber": of.seq,
        "IsSequentialMessage": True,
    })


def acknowledged_seq(msg: Message) -> int:
    content = msg.json()
    if not isinstance(content, dict) or not isinstance(content.get("AcknowledgedMessageSequenceNumber"), int):
        raise WireError("acknowledge without AcknowledgedMessageSequenceNumber")
    return content["AcknowledgedMessageSequenceNumber"]


def channel_closed(session_id: str, output: str) -> Message:
    """What the service sends before closing the websocket (contracts/model.go: ChannelClosed)."""
    return json_message(CHANNEL_CLOSED, {
        "MessageId": str(uuid.uuid4()),
        "CreatedDate": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "DestinationId": "",
        "SessionId": session_id,
        "MessageType": CHANNEL_CLOSED,
        "SchemaVersion": 1,
        "Output": output,
    })


def control(kind: str) -> Message:
    return json_message(kind, {"MessageType": kind, "SchemaVersion": 1})


def flag_payload(flag: int) -> bytes:
    return struct.pack(">I", flag)


def read_flag(payload: bytes) -> int:
    if len(payload) != 4:
        raise WireError(f"flag payload of {len(payload)} bytes")
    return struct.unpack(">I", payload)[0]


def json_payload(content: dict[str, Any]) -> bytes:
    return json.dumps(content).encode()


# --- smux v1 ---------------------------------------------------------------------------------

SMUX_HEADER = struct.Struct("<BBHI")
SYN, FIN, PSH, NOP = 0, 1, 2, 3
SMUX_MAX_FRAME = 32768  # smux DefaultConfig MaxFrameSize


def smux_frame(cmd: int, sid: int, data: bytes = b"") -> bytes:
    return SMUX_HEADER.pack(1, cmd, len(data), sid) + data


class SmuxReader:
    """Frames out of the byte stream, as ``recvLoop`` reads them (whole session fails on a bad one)."""

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buf + data
        frames, pos = [], 0
        while len(buf) - pos >= SMUX_HEADER.size:
            version, cmd, length, sid = SMUX_HEADER.unpack_from(buf, pos)
            if version != 1 or cmd > NOP:
                raise WireError(f"smux: invalid protocol (version {version}, command {cmd})")
            end = pos + SMUX_HEADER.size + length
            if end > len(buf):
                break
            frames.append((cmd, sid, buf[pos + SMUX_HEADER.size : end]))
            pos = end
        self._buf = buf[pos:]
        return frames
