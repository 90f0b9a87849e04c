"""The local password store: stable across restarts with a keyring, new per start in memory-only
mode, reset on request, kept under the versioned key ``v1:local-password:NAME``."""

from __future__ import annotations

from dbtunneld.adapters import keystore as ks
from dbtunneld.engine.local_login import PASSWORD_KIND, LocalPasswords
from helpers.keyrings import InMemoryKeyring


def test_password_is_stable_and_survives_a_restart_with_a_keyring():
    backend = InMemoryKeyring()
    first = LocalPasswords(ks.Keystore(backend)).get("orders")
    assert len(first) >= 20 and first == LocalPasswords(ks.Keystore(backend)).get("orders")   # a restart
    assert backend.get_password(ks.SERVICE, f"v1:{PASSWORD_KIND}:orders") == first
    assert LocalPasswords(ks.Keystore(backend)).get("billing") != first                       # per cluster


def test_memory_only_mode_makes_a_new_password_per_start():
    one, two = LocalPasswords(ks.Keystore.memory()), LocalPasswords(ks.Keystore.memory())
    assert one.get("orders") == one.get("orders") != two.get("orders")


def test_reset_gives_a_new_password_and_logs_no_secret(caplog):
    caplog.set_level("INFO")
    passwords = LocalPasswords(ks.Keystore(InMemoryKeyring()))
    old = passwords.get("orders")
    passwords.reset("orders")
    new = passwords.get("orders")
    assert new != old and "local password reset" in caplog.text
    assert old not in caplog.text and new not in caplog.text


def test_upstream_caching_sha2_full_auth_with_the_servers_rsa_key():
    """A stand-in server written from the caching_sha2_password docs: it asks for full auth, sends
    its RSA public key on request, and decrypts the password (XOR the nonce) with its private key."""
    import socket
    import threading
    import time

    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    from dbtunneld.adapters import mysqlwire as w
    from dbtunneld.core.model import DbCredentials
    from dbtunneld.engine.local_login import LocalLogin, _Exchange

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    server_end, proxy_up = socket.socketpair()
    nonce = w.new_scramble()
    seen: dict = {}

    def server():
        s = _Exchange(server_end)
        s.send(w.Greeting(b"8.0.36", 5, nonce, w.LOGIN_CAPS | w.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
                          | w.CLIENT_CONNECT_WITH_DB | w.CLIENT_MYSQL, 255, 2, w.CACHING_SHA2).build())
        login = w.parse_login(s.read())
        seen["user"], seen["db"] = login.user, login.database
        seen["fast"] = login.auth_response == w.sha2_scramble(b"lease-pw", nonce)
        s.send(bytes([1, w.FULL_AUTH_NEEDED]))
        assert s.read() == w.REQUEST_PUBLIC_KEY
        s.send(b"\x01" + pem)
        oaep = padding.OAEP(mgf=padding.MGF1(algorithm=hashes.SHA1()), algorithm=hashes.SHA1(), label=None)
        plain = key.decrypt(s.read(), oaep)
        seen["password"] = bytes(c ^ nonce[i % 20] for i, c in enumerate(plain))
        s.send(w.ok_payload())
    threading.Thread(target=server, daemon=True).start()

    cred = DbCredentials("v-lease", "lease-pw", "lease/1", time.time() + 60)
    outer = LocalLogin("c", "me", lambda: "local-pw", lambda: cred)
    up = _Exchange(proxy_up)
    greeting = w.parse_greeting(up.read())
    client_login = w.Login(w.LOGIN_CAPS | w.CLIENT_CONNECT_WITH_DB | w.CLIENT_MYSQL, 1 << 24, 45, b"me", b"x" * 32,
                           b"appdb", w.CACHING_SHA2)
    client_end, proxy_down = socket.socketpair()
    down = _Exchange(proxy_down, seq=4)
    outer._log_in_upstream(up, greeting, client_login, down)
    ok, seq = w.read_packet(client_end)
    assert ok[:1] == b"\x00" and seq == 4                    # the server's OK, in the client's sequence
    assert seen == {"user": b"v-lease", "db": b"appdb", "fast": True, "password": b"lease-pw\0"}


def test_upstream_auth_switch_then_caching_sha2_fast_path():
    """The server greets with mysql_native_password, then switches the user to caching_sha2_password
    with a new nonce (AuthSwitchRequest), then confirms the fast path (0x01 0x03) and says OK."""
    import socket
    import threading
    import time

    from dbtunneld.adapters import mysqlwire as w
    from dbtunneld.core.model import DbCredentials
    from dbtunneld.engine.local_login import LocalLogin, _Exchange

    server_end, proxy_up = socket.socketpair()
    first, second = w.new_scramble(), w.new_scramble()
    seen: dict = {}

    def server():
        s = _Exchange(server_end)
        s.send(w.Greeting(b"8.0.36", 5, first, w.LOGIN_CAPS | w.CLIENT_MYSQL, 255, 2, w.NATIVE).build())
        seen["native"] = w.parse_login(s.read()).auth_response == w.native_scramble(b"lease-pw", first)
        s.send(w.auth_switch_payload(w.CACHING_SHA2, second))
        seen["switched"] = s.read() == w.sha2_scramble(b"lease-pw", second)
        s.send(bytes([1, w.FAST_AUTH_OK]))
        s.send(w.ok_payload())
    threading.Thread(target=server, daemon=True).start()

    cred = DbCredentials("v-lease", "lease-pw", "lease/1", time.time() + 60)
    outer = LocalLogin("c", "me", lambda: "local-pw", lambda: cred)
    up = _Exchange(proxy_up)
    greeting = w.parse_greeting(up.read())
    client_end, proxy_down = socket.socketpair()
    outer._log_in_upstream(up, greeting, w.Login(w.LOGIN_CAPS | w.CLIENT_MYSQL, 1 << 24, 45, b"me", b""),
                           _Exchange(proxy_down, seq=2))
    assert w.read_packet(client_end)[0][:1] == b"\x00"
    assert seen == {"native": True, "switched": True}


def test_upstream_tls_required_refuses_a_server_without_tls_with_a_readable_error():
    import socket
    import time

    import pytest

    from dbtunneld.adapters import mysqlwire as w
    from dbtunneld.core.model import DbCredentials
    from dbtunneld.engine.local_login import LocalLogin, LoginRefused, _Exchange

    server_end, proxy_up = socket.socketpair()
    server = _Exchange(server_end)
    server.send(w.Greeting(b"8.0.36", 5, w.new_scramble(), w.LOGIN_CAPS | w.CLIENT_MYSQL, 255, 2, w.NATIVE).build())
    cred = DbCredentials("v-lease", "lease-pw", "lease/1", time.time() + 60)
    outer = LocalLogin("c", "me", lambda: "local-pw", lambda: cred, upstream_tls="required")
    up = _Exchange(proxy_up)
    greeting = w.parse_greeting(up.read())
    with pytest.raises(LoginRefused, match='upstream_tls = "auto"'):
        outer._log_in_upstream(up, greeting, w.Login(w.LOGIN_CAPS | w.CLIENT_MYSQL, 1 << 24, 45, b"me", b""),
                               _Exchange(socket.socketpair()[0], seq=2))
    server_end.setblocking(False)
    with pytest.raises(BlockingIOError):                   # nothing was sent in the clear
        server_end.recv(1)
    with pytest.raises(ValueError, match="upstream_tls"):
        LocalLogin("c", "me", lambda: "", lambda: cred, upstream_tls="yes")
