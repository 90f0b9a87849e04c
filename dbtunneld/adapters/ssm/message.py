"""The SSM data channel's binary message ("agent message") and the JSON payloads it carries.

Wire layout (big-endian), 120 bytes of header then the payload:

====================  =====  ==================================================================
field                 bytes  notes
====================  =====  ==================================================================
header length            4   always 116 (the offset of the payload-length field)
message type            32   ASCII, padded with spaces (``input_stream_data``, ``acknowledge``...)
schema version           4   1
created date             8   epoch milliseconds
sequence number          8   signed; 0 for acknowledgements and control messages
flags                    8   bit 0 SYN (first message of a stream), bit 1 FIN; acks use 3
message id              16   a UUID with its two 8-byte halves swapped (low half first)
payload digest          32   SHA-256 of the payload
payload type             4   1 output, 5/6/7 handshake request/response/complete, 10 flag...
payload length           4
payload                  n
====================  =====  ==================================================================

Pure functions: no sockets, no clock except the ``created`` default.
"""

from __future__ import annotations

import json
import os
import struct
import time
import uuid
from hashlib import sha256
from dataclasses import dataclass, field
from typing import Any

from ...core.errors import ProtocolError

HEADER = struct.Struct(">I32sIQqQ16s32sII")
HEADER_LENGTH = HEADER.size - 4  # 116: what the header-length field holds
PAYLOAD_OFFSET = HEADER.size  # 120

# Message types.
INPUT_STREAM = "input_stream_data"
OUTPUT_STREAM = "output_stream_data"
ACKNOWLEDGE = "acknowledge"
CHANNEL_CLOSED = "channel_closed"
START_PUBLICATION = "start_publication"
PAUSE_PUBLICATION = "pause_publication"
STREAM_TYPES = frozenset({INPUT_STREAM, OUTPUT_STREAM})
UNVALIDATED_TYPES = frozenset({START_PUBLICATION, PAUSE_PUBLICATION})

# Payload types.
OUTPUT = 1
ERROR = 2
SIZE = 3
PARAMETER = 4
HANDSHAKE_REQUEST = 5
HANDSHAKE_RESPONSE = 6
HANDSHAKE_COMPLETE = 7
ENC_CHALLENGE_REQUEST = 8
ENC_CHALLENGE_RESPONSE = 9
FLAG = 10
STDERR = 11
EXIT_CODE = 12

# Flag payloads (a 4-byte big-endian number in a FLAG message).
FLAG_DISCONNECT_TO_PORT = 1
FLAG_TERMINATE_SESSION = 2
FLAG_CONNECT_TO_PORT_ERROR = 3

SYN = 1
FIN = 2
CONTROL_FLAGS = SYN | FIN  # what acknowledgements carry


def now_millis() -> int:
    return int(time.time() * 1000)


class _MessageIds:
    """Random version-4 UUIDs as 16 raw bytes, drawn from a buffer (one getrandom per 1024 ids)."""

    CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
    SET = (0x4 << 76) | (0x2 << 62)

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def next(self) -> bytes:
        if self._pos >= len(self._buf):
            self._buf, self._pos = os.urandom(16 * 1024), 0
        value = int.from_bytes(self._buf[self._pos : self._pos + 16], "big") & self.CLEAR | self.SET
        self._pos += 16
        return value.to_bytes(16, "big")


new_message_id = _MessageIds().next


def id_text(raw_id: bytes) -> str:
    """The canonical text of a 16-byte UUID (what acknowledgements quote)."""
    h = raw_id.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


@dataclass(slots=True)
class AgentMessage:
    """One decoded data-channel message (``message_id``: 16 raw UUID bytes, canonical order)."""

    message_type: str
    sequence_number: int = 0
    payload_type: int = 0
    payload: bytes = b""
    flags: int = 0
    message_id: bytes = field(default_factory=new_message_id)
    created_date: int = field(default_factory=now_millis)
    schema_version: int = 1

    @property
    def uuid(self) -> uuid.UUID:
        return uuid.UUID(bytes=self.message_id)


_TYPE_FIELDS: dict[str, bytes] = {}


def _type_field(message_type: str) -> bytes:
    field_bytes = _TYPE_FIELDS.get(message_type)
    if field_bytes is None:
        kind = message_type.encode("ascii")
        if len(kind) > 32:
            raise ValueError(f"message type too long: {message_type!r}")
        field_bytes = _TYPE_FIELDS.setdefault(message_type, kind.ljust(32, b" "))
    return field_bytes


def encode(msg: AgentMessage) -> bytes:
    """The wire bytes of ``msg`` (digest and lengths computed here)."""
    raw_id = msg.message_id
    header = HEADER.pack(
        HEADER_LENGTH,
        _type_field(msg.message_type),
        msg.schema_version,
        msg.created_date,
        msg.sequence_number,
        msg.flags,
        raw_id[8:] + raw_id[:8],
        sha256(msg.payload).digest(),
        msg.payload_type,
        len(msg.payload),
    )
    return header + msg.payload


def decode(raw: bytes | bytearray | memoryview) -> AgentMessage:
    """Parse and validate one message; ``ProtocolError`` when it is malformed or corrupt."""
    if len(raw) < PAYLOAD_OFFSET:
        raise ProtocolError(f"data channel message too short: {len(raw)} bytes")
    (hl, kind, version, created, seq, flags, raw_id, digest, ptype, plen) = HEADER.unpack_from(raw)
    start = hl + 4
    payload = bytes(raw[start : start + plen])
    if len(payload) != plen:
        raise ProtocolError(f"data channel message truncated: payload {len(payload)} of {plen} bytes")
    message_type = _TYPE_NAMES.get(kind) or kind.strip(b"\x00 ").decode("ascii", "replace")
    msg = AgentMessage(message_type, seq, ptype, payload, flags, raw_id[8:] + raw_id[:8], created, version)
    _validate(msg, hl, digest)
    return msg


_TYPE_NAMES = {_type_field(t): t for t in (INPUT_STREAM, OUTPUT_STREAM, ACKNOWLEDGE, CHANNEL_CLOSED, START_PUBLICATION, PAUSE_PUBLICATION)}


def _validate(msg: AgentMessage, header_length: int, digest: bytes) -> None:
    if msg.message_type in UNVALIDATED_TYPES:
        return
    if header_length == 0 or not msg.message_type or msg.created_date == 0:
        raise ProtocolError(f"data channel message with an empty header field ({msg.message_type or 'no type'})")
    if msg.payload and sha256(msg.payload).digest() != digest:
        raise ProtocolError(f"data channel message {msg.message_type} #{msg.sequence_number}: payload digest mismatch")


# --- message builders -------------------------------------------------------------------------


def stream_message(message_type: str, seq: int, payload_type: int, payload: bytes, *, syn_on_zero: bool = False) -> AgentMessage:
    """A sequenced stream-data message (client: ``input_stream_data``; agent: ``output_stream_data``)."""
    flags = SYN if (syn_on_zero and seq == 0) else 0
    return AgentMessage(message_type, seq, payload_type, payload, flags)


def acknowledgement(acked: AgentMessage) -> AgentMessage:
    """The ``acknowledge`` message for a received stream message."""
    content = (
        f'{{"AcknowledgedMessageType":"{acked.message_type}","AcknowledgedMessageId":"{id_text(acked.message_id)}",'
        f'"AcknowledgedMessageSequenceNumber":{int(acked.sequence_number)},"IsSequentialMessage":true}}'
    )
    return AgentMessage(ACKNOWLEDGE, 0, 0, content.encode(), CONTROL_FLAGS)


_ACK_SEQ_KEY = b'"AcknowledgedMessageSequenceNumber":'


def acknowledged_sequence(ack: AgentMessage) -> int:
    """The sequence number an ``acknowledge`` message refers to."""
    payload = ack.payload
    start = payload.find(_ACK_SEQ_KEY)
    if start >= 0:
        start += len(_ACK_SEQ_KEY)
        end = start
        while end < len(payload) and payload[end] not in b",}":
            end += 1
        try:
            return int(payload[start:end])
        except ValueError:
            pass
    try:
        return int(json.loads(payload)["AcknowledgedMessageSequenceNumber"])
    except (ValueError, KeyError, TypeError) as exc:
        raise ProtocolError(f"malformed acknowledge payload: {exc}") from None


def control_message(message_type: str, content: dict[str, Any] | None = None) -> AgentMessage:
    """An unsequenced service message (``channel_closed``, ``start_publication``...)."""
    payload = json.dumps(content).encode() if content is not None else b""
    return AgentMessage(message_type, 0, 0, payload, CONTROL_FLAGS)


def flag_payload(flag: int) -> bytes:
    return struct.pack(">I", flag)


def parse_flag(payload: bytes) -> int:
    if len(payload) < 4:
        raise ProtocolError(f"flag payload of {len(payload)} bytes")
    flag: int = struct.unpack_from(">I", payload)[0]
    return flag


def json_payload(msg: AgentMessage) -> dict[str, Any]:
    """The JSON object a handshake / channel_closed / ack payload holds."""
    try:
        value = json.loads(msg.payload)
    except ValueError as exc:
        raise ProtocolError(f"{msg.message_type} payload type {msg.payload_type}: invalid JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ProtocolError(f"{msg.message_type} payload type {msg.payload_type}: not a JSON object")
    return value


# --- handshake and channel payloads -----------------------------------------------------------


def open_data_channel(token: str, client_id: str, client_version: str) -> str:
    """The first (text) websocket message: presents the session token. Holds a secret: never log it."""
    return json.dumps(
        {
            "MessageSchemaVersion": "1.0",
            "RequestId": str(uuid.uuid4()),
            "TokenValue": token,
            "ClientId": client_id,
            "ClientVersion": client_version,
        }
    )


def handshake_request(agent_version: str, session_type: str, properties: dict[str, Any]) -> bytes:
    """What the agent sends first: its version and the session type it runs."""
    action = {"ActionType": "SessionType", "ActionParameters": {"SessionType": session_type, "Properties": properties}}
    return json.dumps({"AgentVersion": agent_version, "RequestedClientActions": [action]}).encode()


def handshake_response(client_version: str, processed: list[dict[str, Any]], errors: list[str]) -> bytes:
    return json.dumps({"ClientVersion": client_version, "ProcessedClientActions": processed, "Errors": errors or None}).encode()


def handshake_complete(seconds: float, customer_message: str = "") -> bytes:
    # Go marshals a time.Duration as integer nanoseconds.
    return json.dumps({"HandshakeTimeToComplete": int(seconds * 1e9), "CustomerMessage": customer_message}).encode()


def channel_closed(session_id: str, output: str, destination: str = "") -> dict[str, Any]:
    return {
        "MessageId": str(uuid.uuid4()),
        "CreatedDate": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime()),
        "DestinationId": destination,
        "SessionId": session_id,
        "MessageType": CHANNEL_CLOSED,
        "SchemaVersion": 1,
        "Output": output,
    }
