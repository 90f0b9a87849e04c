"""The MySQL client/server protocol's connection phase: packets, greetings, logins, scrambles.

Written from the protocol documentation (no client library's code):
- MySQL "Connection Phase" (dev.mysql.com/doc/dev/mysql-server/latest/page_protocol_connection_phase.html),
- "Protocol::HandshakeV10" (..._packets_protocol_handshake_v10.html),
- "Protocol::HandshakeResponse41" (..._packets_protocol_handshake_response.html),
- "caching_sha2_password" (page_caching_sha2_authentication_exchanges.html),
- MariaDB KB "Connection" (mariadb.com/kb/en/connection/): the extended capabilities MariaDB
  carries in the greeting's reserved bytes and the response's filler when CLIENT_MYSQL is clear.

Pure functions and dataclasses; the socket work lives in ``local_login``.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass, replace
from typing import Any

# capability flags (Protocol::CapabilityFlags)
CLIENT_MYSQL = 1                       # MariaDB's name for CLIENT_LONG_PASSWORD
CLIENT_CONNECT_WITH_DB = 1 << 3
CLIENT_COMPRESS = 1 << 5
CLIENT_PROTOCOL_41 = 1 << 9
CLIENT_SSL = 1 << 11
CLIENT_SECURE_CONNECTION = 1 << 15
CLIENT_PLUGIN_AUTH = 1 << 19
CLIENT_CONNECT_ATTRS = 1 << 20
CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA = 1 << 21
CLIENT_ZSTD_COMPRESSION = 1 << 26
# what a byte relay cannot carry: compression (both ends would have to agree with us), TLS
NOT_RELAYABLE = CLIENT_COMPRESS | CLIENT_ZSTD_COMPRESSION | CLIENT_SSL
LOGIN_CAPS = CLIENT_PROTOCOL_41 | CLIENT_SECURE_CONNECTION | CLIENT_PLUGIN_AUTH

NATIVE = "mysql_native_password"
CACHING_SHA2 = "caching_sha2_password"
PLUGINS = (NATIVE, CACHING_SHA2)
MAX_PAYLOAD = 0xFFFFFF
SCRAMBLE_LEN = 20
# caching_sha2_password's "more data" answers
FAST_AUTH_OK = 3
FULL_AUTH_NEEDED = 4
REQUEST_PUBLIC_KEY = b"\x02"

ER_ACCESS_DENIED = 1045
ER_UNKNOWN = 1105


class ProtocolError(ValueError):
    """A packet that does not follow the protocol."""


# ---- framing ---------------------------------------------------------------------------------

def frame(payload: bytes, sequence: int) -> bytes:
    """One packet (payloads of 16 MiB and more are split, as the protocol says)."""
    out, seq = [], sequence
    while True:
        part, payload = payload[:MAX_PAYLOAD], payload[MAX_PAYLOAD:]
        out.append(struct.pack("<I", len(part))[:3] + bytes([seq & 0xFF]) + part)
        seq += 1
        if len(part) < MAX_PAYLOAD:
            return b"".join(out)


def read_packet(stream: Any) -> tuple[bytes, int]:
    """(payload, sequence id of its last part) from a socket-like ``stream``; EOFError when closed."""
    payload = b""
    while True:
        header = _read_exact(stream, 4)
        length, seq = int.from_bytes(header[:3], "little"), header[3]
        payload += _read_exact(stream, length)
        if length < MAX_PAYLOAD:
            return payload, seq


def _read_exact(stream: Any, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = stream.recv(n - len(buf))
        if not chunk:
            raise EOFError("the connection closed during the login")
        buf += chunk
    return bytes(buf)


# ---- length-encoded values -------------------------------------------------------------------

def lenenc_int(n: int) -> bytes:
    if n < 251:
        return bytes([n])
    if n < 1 << 16:
        return b"\xfc" + struct.pack("<H", n)
    if n < 1 << 24:
        return b"\xfd" + struct.pack("<I", n)[:3]
    return b"\xfe" + struct.pack("<Q", n)


def read_lenenc_int(data: bytes, pos: int) -> tuple[int, int]:
    first = _byte(data, pos)
    if first < 251:
        return first, pos + 1
    size = {0xFC: 2, 0xFD: 3, 0xFE: 8}.get(first)
    if size is None or pos + 1 + size > len(data):
        raise ProtocolError(f"bad length-encoded integer at byte {pos}")
    return int.from_bytes(data[pos + 1:pos + 1 + size], "little"), pos + 1 + size


def _byte(data: bytes, pos: int) -> int:
    if pos >= len(data):
        raise ProtocolError("packet ends early")
    return data[pos]


def _nul_string(data: bytes, pos: int) -> tuple[bytes, int]:
    end = data.find(b"\0", pos)
    if end < 0:
        return data[pos:], len(data)         # a last string may run to the end of the packet
    return data[pos:end], end + 1


# ---- the server greeting (Protocol::HandshakeV10) ----------------------------------------------

@dataclass(frozen=True)
class Greeting:
    server_version: bytes
    connection_id: int
    scramble: bytes                    # auth-plugin-data, without the trailing NUL
    capabilities: int
    charset: int
    status: int
    plugin: str
    mariadb_caps: int = 0              # MariaDB's extended capabilities (CLIENT_MYSQL clear)

    def build(self) -> bytes:
        caps = self.capabilities
        data = self.scramble
        reserved = b"\0" * 6 + (b"\0" * 4 if caps & CLIENT_MYSQL else struct.pack("<I", self.mariadb_caps))
        return (b"\x0a" + self.server_version + b"\0" + struct.pack("<I", self.connection_id) + data[:8] + b"\0"
                + struct.pack("<HBHH", caps & 0xFFFF, self.charset, self.status, caps >> 16)
                + bytes([len(data) + 1]) + reserved + data[8:] + b"\0" + self.plugin.encode() + b"\0")


def parse_greeting(payload: bytes) -> Greeting:
    if payload[:1] != b"\x0a":
        raise ProtocolError(f"not a protocol 10 greeting (first byte {payload[:1].hex() or 'none'})")
    version, pos = _nul_string(payload, 1)
    if pos + 4 + 8 + 1 + 2 + 1 + 2 + 2 + 1 + 10 > len(payload):
        raise ProtocolError("greeting too short")
    conn_id = struct.unpack_from("<I", payload, pos)[0]
    part1 = payload[pos + 4:pos + 12]
    low, charset, status, high = struct.unpack_from("<HBHH", payload, pos + 13)
    caps = low | high << 16
    data_len = payload[pos + 20]
    reserved = payload[pos + 21:pos + 31]
    pos += 31
    part2_len = max(12, data_len - 9)
    part2 = payload[pos:pos + part2_len]
    pos += part2_len + 1
    plugin = _nul_string(payload, pos)[0].decode() if caps & CLIENT_PLUGIN_AUTH else NATIVE
    mariadb_caps = 0 if caps & CLIENT_MYSQL else struct.unpack("<I", reserved[6:10])[0]
    return Greeting(version, conn_id, part1 + part2, caps, charset, status, plugin, mariadb_caps)


def new_scramble() -> bytes:
    """20 random bytes, none of them NUL (the greeting ends the scramble with a NUL)."""
    return bytes(1 + b % 127 for b in os.urandom(SCRAMBLE_LEN))


# ---- the client's login (Protocol::HandshakeResponse41) -------------------------------------------

@dataclass(frozen=True)
class Login:
    capabilities: int
    max_packet: int
    charset: int
    user: bytes
    auth_response: bytes
    database: bytes | None = None
    plugin: str = ""
    attributes: bytes = b""            # the raw key/value block of CLIENT_CONNECT_ATTRS
    mariadb_caps: int = 0
    extra: bytes = b""                 # anything after the attributes (MySQL's zstd level)

    def build(self) -> bytes:
        caps = self.capabilities
        out = struct.pack("<IIB", caps, self.max_packet, self.charset) + b"\0" * 19
        out += b"\0" * 4 if caps & CLIENT_MYSQL else struct.pack("<I", self.mariadb_caps)
        out += self.user + b"\0"
        if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
            out += lenenc_int(len(self.auth_response)) + self.auth_response
        else:
            out += bytes([len(self.auth_response)]) + self.auth_response
        if caps & CLIENT_CONNECT_WITH_DB:
            out += (self.database or b"") + b"\0"
        if caps & CLIENT_PLUGIN_AUTH:
            out += self.plugin.encode() + b"\0"
        if caps & CLIENT_CONNECT_ATTRS:
            out += lenenc_int(len(self.attributes)) + self.attributes
        return out + self.extra

    def with_(self, **changes: Any) -> "Login":
        return replace(self, **changes)


def is_ssl_request(payload: bytes) -> bool:
    """The 32-byte SSLRequest a client sends before switching to TLS."""
    return len(payload) == 32 and bool(struct.unpack_from("<I", payload)[0] & CLIENT_SSL)


def parse_login(payload: bytes) -> Login:
    if len(payload) < 32:
        raise ProtocolError("login packet too short")
    caps, max_packet, charset = struct.unpack_from("<IIB", payload)
    if not caps & CLIENT_PROTOCOL_41:
        raise ProtocolError("the client speaks the pre-4.1 protocol")
    mariadb_caps = 0 if caps & CLIENT_MYSQL else struct.unpack_from("<I", payload, 28)[0]
    user, pos = _nul_string(payload, 32)
    if caps & CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA:
        n, pos = read_lenenc_int(payload, pos)
    elif caps & CLIENT_SECURE_CONNECTION:
        n, pos = _byte(payload, pos), pos + 1
    else:
        raise ProtocolError("the client uses the pre-4.1 password scheme")
    auth, pos = payload[pos:pos + n], pos + n
    database = None
    if caps & CLIENT_CONNECT_WITH_DB and pos < len(payload):
        database, pos = _nul_string(payload, pos)
    plugin = ""
    if caps & CLIENT_PLUGIN_AUTH and pos < len(payload):
        raw, pos = _nul_string(payload, pos)
        plugin = raw.decode(errors="replace")
    attributes = b""
    if caps & CLIENT_CONNECT_ATTRS and pos < len(payload):
        n, pos = read_lenenc_int(payload, pos)
        attributes, pos = payload[pos:pos + n], pos + n
    return Login(caps, max_packet, charset, user, auth, database, plugin, attributes, mariadb_caps, payload[pos:])


# ---- OK, ERR, auth switch --------------------------------------------------------------------

def ok_payload(status: int = 2) -> bytes:
    """An OK packet: no rows affected, no insert id, ``status`` (2 = autocommit), no warnings."""
    return b"\x00\x00\x00" + struct.pack("<HH", status, 0)


def err_payload(code: int, message: str, sqlstate: str = "28000") -> bytes:
    if 2000 <= code < 3000 or not 1000 <= code < 65535:
        raise ValueError(f"{code} is not a server error code")
    return b"\xff" + struct.pack("<H", code) + b"#" + sqlstate.encode()[:5] + message.encode("utf-8", "replace")[:500]


def parse_err(payload: bytes) -> tuple[int, str]:
    """(code, text) of an ERR packet."""
    if payload[:1] != b"\xff" or len(payload) < 3:
        raise ProtocolError("not an ERR packet")
    code = struct.unpack_from("<H", payload, 1)[0]
    text = payload[3:]
    if text[:1] == b"#":
        text = text[6:]
    return code, text.decode("utf-8", "replace")


def auth_switch_payload(plugin: str, scramble: bytes) -> bytes:
    return b"\xfe" + plugin.encode() + b"\0" + scramble + b"\0"


def parse_auth_switch(payload: bytes) -> tuple[str, bytes]:
    """(plugin, its data) of an AuthSwitchRequest (0xfe)."""
    plugin, pos = _nul_string(payload, 1)
    data = payload[pos:]
    return plugin.decode(errors="replace"), data[:-1] if data.endswith(b"\0") else data


# ---- scrambles -------------------------------------------------------------------------------

def _xor(a: bytes, b: bytes) -> bytes:
    return bytes(x ^ y for x, y in zip(a, b))


def native_scramble(password: bytes, nonce: bytes) -> bytes:
    """mysql_native_password: SHA1(pw) XOR SHA1(nonce + SHA1(SHA1(pw))); empty for no password."""
    if not password:
        return b""
    stage1 = hashlib.sha1(password).digest()
    return _xor(stage1, hashlib.sha1(nonce[:SCRAMBLE_LEN] + hashlib.sha1(stage1).digest()).digest())


def sha2_scramble(password: bytes, nonce: bytes) -> bytes:
    """caching_sha2_password fast path: SHA256(pw) XOR SHA256(SHA256(SHA256(pw)) + nonce)."""
    if not password:
        return b""
    stage1 = hashlib.sha256(password).digest()
    return _xor(stage1, hashlib.sha256(hashlib.sha256(stage1).digest() + nonce[:SCRAMBLE_LEN]).digest())


def scramble_for(plugin: str, password: bytes, nonce: bytes) -> bytes:
    if plugin == NATIVE:
        return native_scramble(password, nonce)
    if plugin == CACHING_SHA2:
        return sha2_scramble(password, nonce)
    raise ProtocolError(f"auth plugin {plugin!r} is not supported (only {', '.join(PLUGINS)})")


def rsa_encrypted_password(password: bytes, nonce: bytes, public_key_pem: bytes) -> bytes:
    """caching_sha2_password full auth without TLS: (pw + NUL) XOR the nonce (repeated), RSA-OAEP
    (SHA-1) with the server's public key."""
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding

    plain = password + b"\0"
    nonce = nonce[:SCRAMBLE_LEN]
    masked = bytes(c ^ nonce[i % len(nonce)] for i, c in enumerate(plain))
    key: Any = serialization.load_pem_public_key(public_key_pem)
    encrypted: bytes = key.encrypt(masked, padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()),
                                                        algorithm=hashes.SHA1(), label=None))
    return encrypted


# ---- COM_CHANGE_USER -------------------------------------------------------------------------
# (MySQL "COM_CHANGE_USER" page_protocol_com_change_user.html; MariaDB KB "COM_CHANGE_USER")

COM_CHANGE_USER = 0x11


@dataclass(frozen=True)
class ChangeUser:
    user: bytes
    auth_response: bytes
    database: bytes = b""
    charset: int = 0
    plugin: str = ""
    attributes: bytes = b""

    def build(self, capabilities: int) -> bytes:
        """The command as a client with ``capabilities`` (the negotiated ones) sends it."""
        out = bytes([COM_CHANGE_USER]) + self.user + b"\0"
        if capabilities & CLIENT_SECURE_CONNECTION:
            out += bytes([len(self.auth_response)]) + self.auth_response
        else:
            out += self.auth_response + b"\0"
        out += self.database + b"\0" + struct.pack("<H", self.charset)
        if capabilities & CLIENT_PLUGIN_AUTH:
            out += self.plugin.encode() + b"\0"
        if capabilities & CLIENT_CONNECT_ATTRS:
            out += lenenc_int(len(self.attributes)) + self.attributes
        return out


def parse_change_user(payload: bytes, capabilities: int) -> ChangeUser:
    """A client's COM_CHANGE_USER; ``capabilities``: what the client negotiated at its login."""
    if payload[:1] != bytes([COM_CHANGE_USER]):
        raise ProtocolError("not a COM_CHANGE_USER packet")
    user, pos = _nul_string(payload, 1)
    if capabilities & CLIENT_SECURE_CONNECTION:
        n = _byte(payload, pos)
        auth, pos = payload[pos + 1:pos + 1 + n], pos + 1 + n
    else:
        auth, pos = _nul_string(payload, pos)
    database, pos = _nul_string(payload, pos)
    charset = 0
    if pos + 2 <= len(payload):
        charset, pos = struct.unpack_from("<H", payload, pos)[0], pos + 2
    plugin = ""
    if capabilities & CLIENT_PLUGIN_AUTH and pos < len(payload):
        raw, pos = _nul_string(payload, pos)
        plugin = raw.decode(errors="replace")
    attributes = b""
    if capabilities & CLIENT_CONNECT_ATTRS and pos < len(payload):
        n, pos = read_lenenc_int(payload, pos)
        attributes = payload[pos:pos + n]
    return ChangeUser(user, auth, database, charset, plugin, attributes)


# ---- what a tunnel reads and sends in place of the server ---------------------------------------

@dataclass(frozen=True)
class ProbeResult:
    """What a greeting probe found: the server's first packet, read and understood."""

    ok: bool                      # a MySQL greeting (protocol 10) came back
    detail: str = ""              # server version, or the server's error
    code: int = 0                 # the server's error code when it refused


def parse_first_packet(payload: bytes) -> ProbeResult:
    """The server's first packet: 0x0a a greeting (its version), 0xff a refusal (code, text).
    ProtocolError for anything else."""
    if payload[:1] == b"\x0a":
        return ProbeResult(True, payload[1:].split(b"\0", 1)[0].decode(errors="replace"))
    if payload[:1] == b"\xff" and len(payload) >= 3:
        code = struct.unpack("<H", payload[1:3])[0]
        text = payload[3:]
        text = text[6:] if text[:1] == b"#" else text
        return ProbeResult(False, text.decode(errors="replace"), code)
    raise ProtocolError(f"not with a MySQL greeting (first byte {payload[:1].hex() or 'none'})")


# What a client of a tunnel that cannot reach its database sees instead of the greeting: a
# server-range ERR packet. 1105 ER_UNKNOWN_ERROR (SQLSTATE HY000) is the server's code for "the
# text says what went wrong"; a specific one (1040 too many connections, 1129 host blocked, 1130
# host not allowed) would send users and the retry rules of their tools down a wrong path, and a
# client-range code (2003) is rejected by libmariadb as a malformed packet (the mariadb CLI then
# prints "ERROR 2027 Received malformed packet" instead of the text).
REFUSED_CODE = ER_UNKNOWN
REFUSED_SQLSTATE = "HY000"


def mysql_error_packet(message: str, code: int = REFUSED_CODE, sqlstate: str = REFUSED_SQLSTATE,
                       sequence: int = 0) -> bytes:
    """A MySQL ERR packet: 0xff, the error code, ``#`` + 5-byte SQLSTATE, the text. Sent instead of
    the server greeting it has sequence id 0 (the greeting's)."""
    if 2000 <= code < 3000 or not 1000 <= code < 65535:
        raise ValueError(f"{code} is not a server error code (2000-2999 are client codes)")
    if len(sqlstate) != 5 or not sqlstate.isascii():
        raise ValueError(f"SQLSTATE must be 5 ASCII characters, not {sqlstate!r}")
    payload = b"\xff" + struct.pack("<H", code) + b"#" + sqlstate.encode() + message.encode("utf-8", "replace")[:500]
    return struct.pack("<I", len(payload))[:3] + bytes([sequence & 0xFF]) + payload
