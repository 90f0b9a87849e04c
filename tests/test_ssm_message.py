"""The SSM data channel's binary message framing (dbtunneld.adapters.ssm.message)."""

from __future__ import annotations

import hashlib
import json
import struct
import uuid

import pytest

from dbtunneld.adapters.ssm import message as m
from dbtunneld.core.errors import ProtocolError


def sample(seq: int = 7, payload: bytes = b"hello agent") -> m.AgentMessage:
    return m.AgentMessage(m.INPUT_STREAM, seq, m.OUTPUT, payload, flags=0, message_id=uuid.uuid4().bytes, created_date=1_700_000_000_123)


def test_round_trip_keeps_every_field():
    msg = sample()
    back = m.decode(m.encode(msg))
    assert back == msg


def test_layout_matches_the_agent_wire_format():
    msg = sample(seq=0x0102030405060708, payload=b"xyz")
    raw = m.encode(msg)
    assert len(raw) == 120 + 3
    assert struct.unpack_from(">I", raw, 0)[0] == 116  # header length: offset of payload length
    assert raw[4:36] == b"input_stream_data".ljust(32, b" ")  # type padded with spaces
    assert struct.unpack_from(">I", raw, 36)[0] == 1  # schema version
    assert struct.unpack_from(">Q", raw, 40)[0] == 1_700_000_000_123  # created, epoch ms
    assert struct.unpack_from(">q", raw, 48)[0] == 0x0102030405060708
    assert struct.unpack_from(">Q", raw, 56)[0] == 0  # flags
    # the UUID travels with its halves swapped: least significant 8 bytes first
    assert raw[64:72] == msg.message_id[8:] and raw[72:80] == msg.message_id[:8]
    assert raw[80:112] == hashlib.sha256(b"xyz").digest()
    assert struct.unpack_from(">II", raw, 112) == (m.OUTPUT, 3)
    assert raw[120:] == b"xyz"


def test_decodes_a_message_built_by_hand_like_the_go_client():
    message_id = uuid.UUID("12345678-9abc-4def-8123-456789abcdef")
    payload = b'{"AcknowledgedMessageSequenceNumber":3}'
    raw = (
        struct.pack(">I", 116)
        + b"acknowledge".ljust(32, b" ")
        + struct.pack(">IQqQ", 1, 1, 0, 3)
        + message_id.bytes[8:]
        + message_id.bytes[:8]
        + hashlib.sha256(payload).digest()
        + struct.pack(">II", 0, len(payload))
        + payload
    )
    msg = m.decode(raw)
    assert msg.message_type == m.ACKNOWLEDGE
    assert msg.uuid == message_id
    assert m.acknowledged_sequence(msg) == 3


def test_digest_mismatch_is_rejected():
    raw = bytearray(m.encode(sample()))
    raw[-1] ^= 0x01  # corrupt the payload
    with pytest.raises(ProtocolError, match="digest"):
        m.decode(bytes(raw))


def test_truncated_and_short_messages_are_rejected():
    raw = m.encode(sample(payload=b"0123456789"))
    with pytest.raises(ProtocolError, match="truncated"):
        m.decode(raw[:-1])
    with pytest.raises(ProtocolError, match="too short"):
        m.decode(raw[:100])


def test_publication_messages_skip_validation_like_the_plugin():
    raw = bytearray(m.encode(m.control_message(m.PAUSE_PUBLICATION)))
    raw[40:48] = bytes(8)  # created date zero would fail validation for any other type
    assert m.decode(bytes(raw)).message_type == m.PAUSE_PUBLICATION


def test_empty_created_date_is_rejected_for_stream_data():
    msg = sample()
    msg.created_date = 0
    with pytest.raises(ProtocolError, match="empty header field"):
        m.decode(m.encode(msg))


def test_acknowledgement_quotes_the_message_it_acknowledges():
    msg = sample(seq=42)
    ack = m.decode(m.encode(m.acknowledgement(msg)))
    assert ack.message_type == m.ACKNOWLEDGE and ack.flags == 3 and ack.sequence_number == 0
    content = json.loads(ack.payload)
    assert content == {
        "AcknowledgedMessageType": m.INPUT_STREAM,
        "AcknowledgedMessageId": str(uuid.UUID(bytes=msg.message_id)),
        "AcknowledgedMessageSequenceNumber": 42,
        "IsSequentialMessage": True,
    }
    assert m.acknowledged_sequence(ack) == 42


def test_acknowledged_sequence_falls_back_to_json_and_rejects_garbage():
    spaced = m.AgentMessage(m.ACKNOWLEDGE, payload=b'{"AcknowledgedMessageSequenceNumber" : 9}')
    assert m.acknowledged_sequence(spaced) == 9
    with pytest.raises(ProtocolError):
        m.acknowledged_sequence(m.AgentMessage(m.ACKNOWLEDGE, payload=b"{}"))


def test_stream_messages_set_syn_on_the_agents_first_message_only():
    assert m.stream_message(m.OUTPUT_STREAM, 0, m.OUTPUT, b"x", syn_on_zero=True).flags == m.SYN
    assert m.stream_message(m.OUTPUT_STREAM, 1, m.OUTPUT, b"x", syn_on_zero=True).flags == 0
    assert m.stream_message(m.INPUT_STREAM, 0, m.OUTPUT, b"x").flags == 0


def test_message_ids_are_distinct_version_4_uuids():
    ids = {m.new_message_id() for _ in range(5000)}
    assert len(ids) == 5000
    for raw in list(ids)[:200]:
        u = uuid.UUID(bytes=raw)
        assert u.version == 4 and u.variant == uuid.RFC_4122


def test_flag_payloads_are_big_endian_numbers():
    assert m.flag_payload(m.FLAG_TERMINATE_SESSION) == b"\x00\x00\x00\x02"
    assert m.parse_flag(b"\x00\x00\x00\x03") == m.FLAG_CONNECT_TO_PORT_ERROR
    with pytest.raises(ProtocolError):
        m.parse_flag(b"\x01")


def test_open_data_channel_and_handshake_payloads():
    opened = json.loads(m.open_data_channel("tok", "client-1", "1.2.650.0"))
    assert opened["TokenValue"] == "tok" and opened["MessageSchemaVersion"] == "1.0"
    assert opened["ClientVersion"] == "1.2.650.0" and len(opened["RequestId"]) == 36
    request = json.loads(m.handshake_request("3.3.1.0", "Port", {"portNumber": "22"}))
    action = request["RequestedClientActions"][0]
    assert action["ActionType"] == "SessionType"
    assert action["ActionParameters"] == {"SessionType": "Port", "Properties": {"portNumber": "22"}}
    assert json.loads(m.handshake_complete(0.5))["HandshakeTimeToComplete"] == 500_000_000


def test_json_payload_rejects_non_objects():
    with pytest.raises(ProtocolError):
        m.json_payload(m.AgentMessage(m.OUTPUT_STREAM, payload=b"[1]"))
    with pytest.raises(ProtocolError):
        m.json_payload(m.AgentMessage(m.OUTPUT_STREAM, payload=b"{nope"))
