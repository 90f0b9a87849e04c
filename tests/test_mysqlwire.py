"""The connection-phase codec: scrambles against PyMySQL's independent implementation (used here
only, never by the product), greetings and logins round-trip, OK/ERR, the RSA password."""

from __future__ import annotations

import os

import pytest

from dbtunneld.adapters import mysqlwire as w
from dbtunneld.engine.local_login import FREE_WRONG, MAX_LOCK, WrongPasswordLimiter

pymysql_auth = pytest.importorskip("pymysql._auth")

PASSWORDS = [b"secret", b"x", "pässwörd".encode(), os.urandom(40), b"a" * 200]


@pytest.mark.parametrize("password", PASSWORDS)
def test_native_scramble_matches_pymysql(password):
    nonce = w.new_scramble()
    assert w.native_scramble(password, nonce) == pymysql_auth.scramble_native_password(password, nonce)


@pytest.mark.parametrize("password", PASSWORDS)
def test_caching_sha2_scramble_matches_pymysql(password):
    nonce = w.new_scramble()
    assert w.sha2_scramble(password, nonce) == pymysql_auth.scramble_caching_sha2(password, nonce)


def test_known_native_vector():
    # SHA1("secret") and the nonce 0x01..0x14, computed with hashlib by hand (sha1 of sha1, xor)
    import hashlib
    nonce = bytes(range(1, 21))
    s1 = hashlib.sha1(b"secret").digest()
    s3 = hashlib.sha1(nonce + hashlib.sha1(s1).digest()).digest()
    assert w.native_scramble(b"secret", nonce) == bytes(a ^ b for a, b in zip(s1, s3))
    assert w.native_scramble(b"", nonce) == b"" == w.sha2_scramble(b"", nonce)


def test_scramble_has_no_nul_and_varies():
    a, b = w.new_scramble(), w.new_scramble()
    assert len(a) == 20 and b"\0" not in a and a != b


def test_unknown_plugin_is_a_protocol_error():
    with pytest.raises(w.ProtocolError, match="client_ed25519"):
        w.scramble_for("client_ed25519", b"x", w.new_scramble())


def test_rsa_password_decrypts_to_password_xor_nonce():
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    nonce = w.new_scramble()
    ours = w.rsa_encrypted_password(b"secret", nonce, pem)
    oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
    # PyMySQL's version, decrypted with the same key, gives the same plain text
    theirs = pymysql_auth.sha2_rsa_encrypt(b"secret", nonce, pem)
    assert key.decrypt(ours, oaep) == key.decrypt(theirs, oaep)


def test_greeting_round_trip_keeps_mariadb_capabilities():
    g = w.Greeting(b"5.5.5-10.11.6-MariaDB", 42, w.new_scramble(), 0xF7FE & ~w.CLIENT_MYSQL | w.CLIENT_PLUGIN_AUTH
                   | w.CLIENT_SECURE_CONNECTION | w.CLIENT_CONNECT_ATTRS, 45, 2, w.NATIVE, mariadb_caps=0x1D)
    assert w.parse_greeting(g.build()) == g
    mysql = w.Greeting(b"8.0.36", 7, w.new_scramble(), g.capabilities | w.CLIENT_MYSQL, 255, 2, w.CACHING_SHA2)
    assert w.parse_greeting(mysql.build()) == mysql


@pytest.mark.parametrize("lenenc", [True, False])
def test_login_round_trip(lenenc):
    caps = (w.CLIENT_PROTOCOL_41 | w.CLIENT_SECURE_CONNECTION | w.CLIENT_PLUGIN_AUTH | w.CLIENT_CONNECT_WITH_DB
            | w.CLIENT_CONNECT_ATTRS | (w.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA if lenenc else 0))
    attrs = b"\x0c_client_name\x07pymysql"
    login = w.Login(caps, 1 << 24, 45, b"orders", os.urandom(20), b"appdb", w.NATIVE, attrs, mariadb_caps=4)
    assert w.parse_login(login.build()) == login
    no_db = login.with_(capabilities=caps & ~w.CLIENT_CONNECT_WITH_DB, database=None)
    assert w.parse_login(no_db.build()) == no_db


def test_pre_41_login_is_refused():
    with pytest.raises(w.ProtocolError, match="pre-4.1"):
        w.parse_login(b"\0" * 40)


def test_err_packet_and_framing():
    packet = w.frame(w.err_payload(1045, "Access denied"), 2)
    assert packet[3] == 2 and w.parse_err(packet[4:]) == (1045, "Access denied")
    with pytest.raises(ValueError):
        w.err_payload(2003, "client range")
    big = os.urandom(w.MAX_PAYLOAD + 10)
    framed = w.frame(big, 0)

    class Stream:
        def __init__(self, data):
            self.data = data

        def recv(self, n):
            out, self.data = self.data[:n], self.data[n:]
            return out
    assert w.read_packet(Stream(framed)) == (big, 1)


def test_wrong_password_limiter_locks_with_backoff_and_resets():
    now = [100.0]
    limiter = WrongPasswordLimiter(clock=lambda: now[0])
    for _ in range(FREE_WRONG - 1):
        assert limiter.failed() == 0
    locks = [limiter.failed() for _ in range(10)]
    assert locks[:3] == [1.0, 2.0, 4.0] and locks[-1] == MAX_LOCK
    assert limiter.locked_for() == MAX_LOCK
    now[0] += MAX_LOCK
    assert limiter.locked_for() == 0
    limiter.succeeded()
    assert limiter.failed() == 0


def test_upstream_login_mirrors_the_client_minus_compression():
    """The sandbox's MariaDB runs without performance_schema, so the attributes are checked here."""
    from dbtunneld.engine.local_login import LocalLogin
    server = w.Greeting(b"8.0.36", 9, w.new_scramble(), 0xFFFFFFFF & ~w.CLIENT_MYSQL, 255, 2, w.CACHING_SHA2)
    attrs = b"\x0c_client_name\x07libmysql"
    client = w.Login(0x01FFFFFF & ~w.CLIENT_MYSQL, 1 << 24, 8, b"orders", b"x" * 20, b"appdb", w.NATIVE, attrs,
                     mariadb_caps=5)
    up = w.parse_login(LocalLogin._upstream_login(server, client, "v-lease-user", w.CACHING_SHA2, b"pw").build())
    assert up.user == b"v-lease-user" and up.plugin == w.CACHING_SHA2
    assert up.auth_response == w.sha2_scramble(b"pw", server.scramble)
    assert (up.database, up.charset, up.attributes, up.max_packet) == (b"appdb", 8, attrs, 1 << 24)
    assert up.capabilities == client.capabilities & ~w.NOT_RELAYABLE
    assert not up.capabilities & (w.CLIENT_COMPRESS | w.CLIENT_SSL)
    no_db = LocalLogin._upstream_login(server, client.with_(database=None), "u", w.NATIVE, b"pw")
    assert not w.parse_login(no_db.build()).capabilities & w.CLIENT_CONNECT_WITH_DB


def test_change_user_round_trips_with_the_negotiated_capabilities():
    caps = w.CLIENT_PROTOCOL_41 | w.CLIENT_SECURE_CONNECTION | w.CLIENT_PLUGIN_AUTH | w.CLIENT_CONNECT_ATTRS
    asked = w.ChangeUser(b"orders", b"\x01" * 20, b"shop", 45, w.NATIVE, b"\x03k_1\x02v1")
    assert w.parse_change_user(asked.build(caps), caps) == asked
    bare = w.ChangeUser(b"orders", b"\x02" * 20, b"", 33)             # no plugin, no attributes
    plain = w.CLIENT_PROTOCOL_41 | w.CLIENT_SECURE_CONNECTION
    assert w.parse_change_user(bare.build(plain), plain) == bare
