"""The tunnel health probe that logs in with the cluster's current DB user (``login_probe``), so
probes never count as aborted connects against MySQL's max_connect_errors; the paramiko channel
seen as a socket for PyMySQL (``ChannelSocket``)."""

from __future__ import annotations

import logging
import struct
from typing import Any, Callable

from ..core.errors import TransientError
from ..core.model import DbCredentials

log = logging.getLogger(__name__)

def login_probe(credentials: Callable[[], DbCredentials | None],
                on_read_only: Callable[[bool], None] | None = None) -> Callable[..., Any]:
    """A tunnel probe that logs in with the cluster's current DB user, then quits.

    The greeting-only probe (``tunnel_health.probe_mysql``) aborts the handshake, which MySQL counts
    against max_connect_errors for the bastion's address; a completed login resets that count.
    Until the cluster has credentials, the greeting-only probe. ``on_read_only`` gets the
    server's read-only flag after each login (``aurora.read_only_flags``).
    """
    from .tunnel_health import probe_mysql

    def probe(transport: Any, host: str, port: int, timeout: float) -> Any:
        cred = credentials()
        if cred is None:
            return probe_mysql(transport, host, port, timeout)
        return probe_mysql_login(transport, host, port, timeout, cred, on_read_only)
    return probe


def probe_mysql_login(transport: Any, host: str, port: int, timeout: float, cred: DbCredentials,
                      on_read_only: Callable[[bool], None] | None = None) -> Any:
    """Log in over a channel of ``transport`` and quit. A server error (1045 access denied, 1129
    host blocked, ...) is a refusal (``ok=False``); no answer or not MySQL raises TransientError."""
    import pymysql

    from ..adapters.mysqlwire import ProbeResult

    conn = pymysql.connections.Connection(host=host, port=port, user=cred.username, password=cred.password,
                                          connect_timeout=timeout, read_timeout=timeout,
                                          write_timeout=timeout, defer_connect=True,
                                          ssl_disabled=True)
    # ssl_disabled: this PyMySQL (2.2) switches to TLS whenever the server offers it (Aurora does, as
    # does the sandbox with mariadb_tls), and a channel cannot be wrapped; the tunnel encrypts the path
    chan = ChannelSocket(transport.open_channel(host, port, timeout))
    try:
        conn.connect(chan)
        version = conn.get_server_info()
        if on_read_only is not None:
            _report_read_only(conn, on_read_only, host, port)
    except pymysql.err.MySQLError as exc:
        return _login_refusal(exc, host, port)
    except (EOFError, IndexError, ValueError, struct.error) as exc:
        raise TransientError(f"{host}:{port} answered, but not like MySQL ({type(exc).__name__})") from None
    finally:
        if conn.open:
            conn.close()                 # COM_QUIT: a clean end, not an aborted connection
        chan.close()
    return ProbeResult(True, version)


def _report_read_only(conn: Any, on_read_only: Callable[[bool], None], host: str, port: int) -> None:
    import pymysql

    from .aurora import read_only_flags

    try:
        read_only = read_only_flags(conn)
    except pymysql.err.MySQLError as exc:      # the login worked: the path is fine, the role unknown
        log.info("could not read the read-only flags at %s:%d: %s", host, port, exc)
        return
    on_read_only(read_only)


def _login_refusal(exc: Exception, host: str, port: int) -> Any:
    """A server's error is a refusal; a client-side one (2xxx: lost, cannot connect) a dead path."""
    from ..adapters.mysqlwire import ProbeResult

    code = exc.args[0] if exc.args and isinstance(exc.args[0], int) else 0
    message = str(exc.args[1]) if len(exc.args) > 1 else str(exc)
    if code and not 2000 <= code < 3000:
        return ProbeResult(False, message, code)
    raise TransientError(f"no MySQL login at {host}:{port}: {message}") from None


class ChannelSocket:
    """A transport channel as the socket PyMySQL reads and writes (it reads through ``makefile``)."""

    def __init__(self, chan: Any) -> None:
        self._chan = chan

    def settimeout(self, timeout: float | None) -> None:
        if hasattr(self._chan, "settimeout"):
            self._chan.settimeout(timeout)

    def sendall(self, data: bytes) -> None:
        self._chan.sendall(data)

    def makefile(self, mode: str) -> "ChannelSocket":
        return self

    def read(self, n: int) -> bytes:
        """Up to ``n`` bytes, fewer only at the end of the stream (PyMySQL reports that as lost)."""
        buf = b""
        while len(buf) < n:
            chunk = self._chan.recv(n - len(buf))
            if not chunk:
                break
            buf += chunk
        return buf

    def close(self) -> None:
        try:
            self._chan.close()
        except Exception:
            pass
