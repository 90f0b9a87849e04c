"""The stable local login on a tunnel's port (``login = "local"``).

A client logs in to 127.0.0.1:PORT with the cluster's local user and password (stable: random
per machine and cluster, kept in the keychain). ``LocalLogin`` is the tunnel's ``before_relay``
step for one connection: it reads the real server's greeting from the freshly opened channel,
greets the client with the same greeting but its own scramble, verifies the client's answer
(mysql_native_password or caching_sha2_password: the fast path only, as the proxy knows the
password, so a mismatch is a wrong password), logs in upstream as the cluster's current leased
user, hands the client the server's OK, and returns: from then on the tunnel relays bytes
untouched. New connections therefore use the newest lease; open ones keep theirs.

With ``tls`` (``local_tls = true``) the client may switch to TLS (a self-signed per-machine
certificate, ``local_tls``); the relay then gets a bridged plain socket. With ``upstream_tls``
("auto": when the server offers it; "required": refuse servers that do not) the upstream login
switches the channel to TLS first (``upstream_tls``) and the relay gets a bridged socket for it.

COM_CHANGE_USER after the login: the relay watches the client's commands (``command_watch``) and
hands that one to ``_Session.change_user``: the local user and password are verified again (the
same plugins and nonce as the login), the server gets a COM_CHANGE_USER for the current leased
user, and the client gets the server's answer; a wrong local password is an ERR 1045 and the
session stays as it was.
"""

from __future__ import annotations

import hmac
import logging
import secrets
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..adapters import local_tls, upstream_tls as utls
from ..adapters import mysqlwire as w
from ..adapters.command_watch import CommandWatch, Handoff
from ..core.config import ClusterConfig
from ..core.model import DbCredentials

log = logging.getLogger(__name__)

LOGIN_TIMEOUT = 15.0             # seconds a whole login (client side and upstream) may take
FREE_WRONG = 3                   # wrong passwords in a row before the port starts to lock
MAX_LOCK = 60.0                  # the longest lock after wrong passwords
PASSWORD_KIND = "local-password"


def local_user(c: ClusterConfig) -> str:
    """The stable local user of a ``login = "local"`` cluster (its reader port shares it)."""
    return c.local_user or c.reader_of or c.name


class LoginRefused(Exception):
    """The login ends with an ERR to the client (``code``, text)."""

    def __init__(self, code: int, text: str, sqlstate: str = "HY000") -> None:
        super().__init__(text)
        self.code, self.text, self.sqlstate = code, text, sqlstate


# ---- the local password ----------------------------------------------------------------------

class LocalPasswords:
    """One random password per cluster, kept in the keystore (``v1:local-password:NAME``). In
    memory-only mode it lives as long as the daemon: a restart makes a new one."""

    def __init__(self, keystore: Any) -> None:
        self._keystore = keystore
        self._lock = threading.Lock()

    def get(self, name: str) -> str:
        with self._lock:
            value = self._keystore.get(PASSWORD_KIND, name)
            if not value:
                value = self._new(name)
            return value

    def reset(self, name: str) -> None:
        with self._lock:
            self._new(name)
        log.info("[cluster=%s] local password reset; saved logins need the new one", name)

    def _new(self, name: str) -> str:
        value = secrets.token_urlsafe(18)
        self._keystore.set(PASSWORD_KIND, name, value)
        return value


# ---- wrong passwords -------------------------------------------------------------------------

class WrongPasswordLimiter:
    """Per port: after FREE_WRONG wrong passwords in a row, each next one locks the port for
    1, 2, 4 ... MAX_LOCK seconds (every login is refused while locked). A right one resets it."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self.wrong = 0
        self._until = 0.0

    def locked_for(self) -> float:
        with self._lock:
            return max(0.0, self._until - self._clock())

    def failed(self) -> float:
        """Count a wrong password; return how long the port is now locked."""
        with self._lock:
            self.wrong += 1
            over = self.wrong - FREE_WRONG
            lock = 0.0 if over < 0 else min(MAX_LOCK, 2.0 ** over)
            self._until = self._clock() + lock
            return lock

    def succeeded(self) -> None:
        with self._lock:
            self.wrong, self._until = 0, 0.0


# ---- one connection's login ------------------------------------------------------------------

@dataclass
class _Exchange:
    """Packets of one side of the login, with their sequence ids."""
    stream: Any
    seq: int = 0

    def read(self) -> bytes:
        payload, seq = w.read_packet(self.stream)
        self.seq = (seq + 1) & 0xFF
        return payload

    def send(self, payload: bytes) -> None:
        self.stream.sendall(w.frame(payload, self.seq))
        self.seq = (self.seq + 1) & 0xFF


class LocalLogin:
    """``before_relay(client, channel) -> socket | None`` for one tunnel (see the module doc):
    the socket to relay (the client, or a bridge to its TLS connection), None when refused.

    ``user``: the local user name; ``password()``: the current local password;
    ``credentials()``: the cluster's current leased DB user (None while there is none).
    ``greeting_plugin`` forces the plugin offered to clients (default: the server's, if supported).
    """

    def __init__(self, name: str, user: str, password: Callable[[], str],
                 credentials: Callable[[], DbCredentials | None], *, limiter: WrongPasswordLimiter | None = None,
                 timeout: float = LOGIN_TIMEOUT, greeting_plugin: str = "",
                 tls: ssl.SSLContext | None = None, upstream_tls: str = "off") -> None:
        self.name = name
        self.user = user
        self._password = password
        self._credentials = credentials
        self.limiter = limiter or WrongPasswordLimiter()
        self.timeout = timeout
        self._greeting_plugin = greeting_plugin
        self._tls = tls
        if upstream_tls not in utls.MODES:
            raise ValueError(f"upstream_tls must be one of {', '.join(utls.MODES)}, not {upstream_tls!r}")
        self.upstream_tls = upstream_tls

    def __call__(self, client: socket.socket, channel: Any) -> Handoff | None:
        down, up = _Exchange(client), _Exchange(channel)
        _set_timeout(client, self.timeout)
        _set_timeout(channel, self.timeout)
        try:
            session = self._login(down, up)
            watch = CommandWatch(w.COM_CHANGE_USER, session.change_user)
            server = utls.bridge(up.stream, f"tunnel-{self.name}") if up.stream is not channel else None
            if down.stream is client:
                return Handoff(client, watch, server)
            return Handoff(local_tls.bridge(down.stream, f"tunnel-{self.name}"), watch, server)
        except LoginRefused as exc:
            _try_send(down, w.err_payload(exc.code, exc.text, exc.sqlstate))
        except w.ProtocolError as exc:
            log.warning("[tunnel=%s] local login: %s", self.name, exc)
            _try_send(down, w.err_payload(w.ER_UNKNOWN, f"dbtunneld: {exc}", "08S01"))
        except (OSError, EOFError) as exc:
            log.info("[tunnel=%s] local login ended: %s", self.name, exc or type(exc).__name__)
        finally:
            _set_timeout(client, None)
            _set_timeout(channel, None)
        if down.stream is not client:
            _close_quietly(down.stream)
        if up.stream is not channel:
            _close_quietly(up.stream)
        return None

    def _login(self, down: _Exchange, up: _Exchange) -> "_Session":
        server = self._server_greeting(up)
        ours = self._client_greeting(server)
        down.send(ours.build())
        login = self._verify_client(down, ours)
        upstream_caps = self._log_in_upstream(up, server, login, down)
        return _Session(self, server, ours, login.capabilities & ours.capabilities, upstream_caps)

    # ---- the client side

    def _server_greeting(self, up: _Exchange) -> w.Greeting:
        payload = up.read()
        if payload[:1] == b"\xff":
            code, text = w.parse_err(payload)
            raise LoginRefused(w.ER_UNKNOWN, f"dbtunneld: the server refused the connection: {code} {text}")
        return w.parse_greeting(payload)

    def _client_greeting(self, server: w.Greeting) -> w.Greeting:
        plugin = self._greeting_plugin or (server.plugin if server.plugin in w.PLUGINS else w.NATIVE)
        caps = (server.capabilities & ~w.NOT_RELAYABLE) | w.LOGIN_CAPS | (w.CLIENT_SSL if self._tls else 0)
        return w.Greeting(server.server_version, server.connection_id, w.new_scramble(), caps,
                          server.charset, server.status, plugin, server.mariadb_caps)

    def _verify_client(self, down: _Exchange, ours: w.Greeting) -> w.Login:
        payload = down.read()
        if w.is_ssl_request(payload) and self._tls is not None:
            down.stream = self._tls.wrap_socket(down.stream, server_side=True)
            payload = down.read()
        if w.is_ssl_request(payload):
            raise LoginRefused(w.ER_UNKNOWN, "dbtunneld: the local port does not offer TLS (the tunnel "
                                             "encrypts the path); turn off 'require SSL' for 127.0.0.1", "08004")
        login = w.parse_login(payload)
        self.authenticate(down, login.user, login.plugin, login.auth_response, ours)
        return login

    def authenticate(self, down: _Exchange, user: bytes, plugin: str, answer: bytes, ours: w.Greeting) -> None:
        """Check the client's answer to our nonce (switching it to our plugin when it used another);
        LoginRefused when wrong or while the port is locked."""
        locked = self.limiter.locked_for()
        if locked > 0:
            raise LoginRefused(w.ER_ACCESS_DENIED, f"dbtunneld: too many wrong passwords on this port; "
                                                   f"try again in {locked:.0f} s", "28000")
        nonce = ours.scramble
        if plugin not in w.PLUGINS:
            plugin = ours.plugin
            down.send(w.auth_switch_payload(plugin, nonce))
            answer = down.read()
        if not self._right(user, plugin, answer, nonce):
            self._wrong(user)
        self.limiter.succeeded()
        if plugin == w.CACHING_SHA2:
            down.send(bytes([1, w.FAST_AUTH_OK]))

    def _right(self, user: bytes, plugin: str, answer: bytes, nonce: bytes) -> bool:
        expected = w.scramble_for(plugin, self._password().encode(), nonce)
        right_user = hmac.compare_digest(user, self.user.encode())
        return hmac.compare_digest(answer, expected) and right_user

    def _wrong(self, user: bytes) -> None:
        lock = self.limiter.failed()
        shown = user.decode(errors="replace")[:64]
        log.warning("[tunnel=%s] wrong local user or password for %r (%d in a row%s)", self.name, shown,
                    self.limiter.wrong, f"; port locked for {lock:.0f} s" if lock else "")
        raise LoginRefused(w.ER_ACCESS_DENIED, f"Access denied for user '{shown}'@'localhost' (dbtunneld: "
                                               f"use the local user and password of `dbtunneld creds {self.name}`)",
                           "28000")

    # ---- the upstream side

    def current_lease(self) -> DbCredentials:
        cred = self._credentials()
        if cred is None:
            raise LoginRefused(w.ER_UNKNOWN, f"dbtunneld: cluster {self.name!r} has no database user yet; "
                                             "see `dbtunneld status`")
        return cred

    def _log_in_upstream(self, up: _Exchange, server: w.Greeting, login: w.Login, down: _Exchange) -> int:
        """Log in as the lease; the capabilities it negotiated with the server."""
        cred = self.current_lease()
        password = cred.password.encode()
        plugin = upstream_plugin(server)
        upstream = self._upstream_login(server, login, cred.username, plugin, password)
        if self._upstream_wants_tls(server):
            upstream = upstream.with_(capabilities=upstream.capabilities | w.CLIENT_SSL)
            up.send(upstream.build()[:32])             # its first 32 bytes: the SSLRequest
            up.stream = utls.TlsStream(up.stream, utls.client_context())
            up.stream.handshake()
        up.send(upstream.build())
        self.finish_upstream_auth(up, down, cred.username, plugin, password, server.scramble)
        return upstream.capabilities

    def _upstream_wants_tls(self, server: w.Greeting) -> bool:
        offered = bool(server.capabilities & w.CLIENT_SSL)
        if self.upstream_tls == "required" and not offered:
            raise LoginRefused(w.ER_UNKNOWN, f"dbtunneld: upstream_tls = \"required\" but the database does not "
                                             f"offer TLS; set upstream_tls = \"auto\" for cluster {self.name!r}",
                               "08004")
        return offered and self.upstream_tls != "off"

    def finish_upstream_auth(self, up: _Exchange, down: _Exchange, username: str, plugin: str,
                             password: bytes, nonce: bytes) -> None:
        """The server's answers after a login or COM_CHANGE_USER as the lease (auth switch,
        caching_sha2 rounds) up to its OK, which goes to the client (``down``)."""
        while True:
            payload = up.read()
            kind = payload[:1]
            if kind == b"\x00":
                down.send(payload)
                return
            if kind == b"\xff":
                code, text = w.parse_err(payload)
                log.warning("[tunnel=%s] upstream login as %s refused: %d %s", self.name, username, code, text)
                raise LoginRefused(w.ER_UNKNOWN, f"dbtunneld: the database refused the leased user "
                                                 f"{username}: {code} {text}")
            if kind == b"\xfe":
                plugin, nonce = w.parse_auth_switch(payload)
                up.send(w.scramble_for(plugin, password, nonce))
            elif kind == b"\x01" and plugin == w.CACHING_SHA2:
                self._caching_sha2_more(up, payload, password, nonce)
            else:
                raise w.ProtocolError(f"unexpected packet {payload[:1].hex()} during the upstream login")

    @staticmethod
    def _upstream_login(server: w.Greeting, login: w.Login, user: str, plugin: str, password: bytes) -> w.Login:
        caps = (login.capabilities & server.capabilities & ~w.NOT_RELAYABLE) | w.LOGIN_CAPS
        caps |= server.capabilities & w.CLIENT_PLUGIN_AUTH_LENENC_CLIENT_DATA
        caps = caps | w.CLIENT_CONNECT_WITH_DB if login.database else caps & ~w.CLIENT_CONNECT_WITH_DB
        if not server.capabilities & w.CLIENT_CONNECT_ATTRS:
            caps &= ~w.CLIENT_CONNECT_ATTRS
        return login.with_(capabilities=caps, user=user.encode(), plugin=plugin, extra=b"",
                           auth_response=w.scramble_for(plugin, password, server.scramble))

    @staticmethod
    def _caching_sha2_more(up: _Exchange, payload: bytes, password: bytes, nonce: bytes) -> None:
        """caching_sha2_password's extra round: fast auth OK, or full auth with the server's RSA key."""
        if payload[1:2] == bytes([w.FAST_AUTH_OK]):
            return
        if payload[1:2] != bytes([w.FULL_AUTH_NEEDED]):
            raise w.ProtocolError("unexpected caching_sha2_password message")
        up.send(w.REQUEST_PUBLIC_KEY)
        key = up.read()
        if key[:1] != b"\x01":
            raise w.ProtocolError("the server sent no RSA public key")
        up.send(w.rsa_encrypted_password(password, nonce, key[1:]))


def upstream_plugin(server: w.Greeting) -> str:
    return server.plugin if server.plugin in w.PLUGINS else w.NATIVE


class _Session:
    """What one logged-in connection keeps for a later COM_CHANGE_USER (``change_user``, the
    ``CommandWatch`` handler: blocking sockets, on the relay's worker thread)."""

    def __init__(self, login: LocalLogin, server: w.Greeting, ours: w.Greeting,
                 client_caps: int, upstream_caps: int) -> None:
        self.login, self.server, self.ours = login, server, ours
        self.client_caps, self.upstream_caps = client_caps, upstream_caps

    def change_user(self, client: socket.socket, upstream: socket.socket, held: bytes) -> bytes:
        """Returns the bytes the client sent after the command; raises to end the connection."""
        reader = _Prefixed(client, held)
        down, up = _Exchange(reader), _Exchange(upstream)
        _set_timeout(client, self.login.timeout)
        _set_timeout(upstream, self.login.timeout)
        try:
            asked = w.parse_change_user(down.read(), self.client_caps)
            try:
                self.login.authenticate(down, asked.user, asked.plugin, asked.auth_response, self.ours)
            except LoginRefused as exc:          # the session stays the lease's, as it was
                down.send(w.err_payload(exc.code, exc.text, exc.sqlstate))
                return reader.rest()
            self._change_upstream(up, down, asked)
        except LoginRefused as exc:
            _try_send(down, w.err_payload(exc.code, exc.text, exc.sqlstate))
            raise
        finally:
            _set_timeout(client, None)
        log.info("[tunnel=%s] COM_CHANGE_USER: the session logged in again as the lease", self.login.name)
        return reader.rest()

    def _change_upstream(self, up: _Exchange, down: _Exchange, asked: w.ChangeUser) -> None:
        cred = self.login.current_lease()
        password = cred.password.encode()
        plugin = upstream_plugin(self.server)
        nonce = self.server.scramble
        command = w.ChangeUser(cred.username.encode(), w.scramble_for(plugin, password, nonce),
                               asked.database, asked.charset or self.server.charset, plugin, asked.attributes)
        up.send(command.build(self.upstream_caps))
        self.login.finish_upstream_auth(up, down, cred.username, plugin, password, nonce)


class _Prefixed:
    """A socket read first from bytes already taken off it."""

    def __init__(self, sock: socket.socket, prefix: bytes) -> None:
        self._sock, self._prefix = sock, prefix

    def recv(self, n: int) -> bytes:
        if self._prefix:
            out, self._prefix = self._prefix[:n], self._prefix[n:]
            return out
        return self._sock.recv(n)

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)

    def rest(self) -> bytes:
        rest, self._prefix = self._prefix, b""
        return rest


def _set_timeout(stream: Any, timeout: float | None) -> None:
    setter = getattr(stream, "settimeout", None)
    if setter is not None:
        try:
            setter(timeout)
        except OSError:             # a client socket handed over to TLS (detached)
            pass


def _close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except OSError:
        pass


def _try_send(down: _Exchange, payload: bytes) -> None:
    try:
        down.send(payload)
    except OSError:
        pass
