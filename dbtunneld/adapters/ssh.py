"""SSH to the bastion with paramiko, tuned for forwarding: the adapter under the ssh transports.

Owns: connecting over a socket-like (TCP with TCP_NODELAY, an SSM stream, a ProxyCommand), the
keepalive ping that notices a frozen bastion, opening ``direct-tcpip`` channels, and classifying
paramiko's failures into the errors of ``dbtunneld.core.errors``; this module never retries (the
tunnel owns retries). Its parts: ``ssh_options`` (what to connect with), ``ssh_hostkeys``
(known_hosts / pinned key; never auto-accepted), ``ssh_auth`` (key file, ssh-agent, ephemeral EC2
Instance Connect key), ``ssh_channel`` (channels as forwarding upstreams) and
``paramiko_internals`` (the only user of paramiko's non-public API).

Tuning (see STACK-NOTES, "SSH forwarding speed"): 16 MiB channel windows, 256 KiB packets,
aes128-gcm first, TCP_NODELAY, a reader thread that blocks without a timeout once logged in
(no poll() per read, no idle wake-ups), channel data written straight into the client's socket
by that thread, and the packets of one forwarding-loop turn written together. Its end and its
keepalive replies are events from that thread (``on_closed``, ``keepalive``): nothing polls.
"""

from __future__ import annotations

import logging
import socket
import threading
from typing import Any, Callable

import paramiko

from ..core.errors import PermissionDeniedError, TransientError
from . import paramiko_internals
from .ssh_auth import authenticate
from .ssh_channel import ChannelUpstream, ForwardChannel
from .ssh_hostkeys import prefer_known_key_types, verify_host_key
from .ssh_options import MAX_PACKET, SSH_PORT, WINDOW_SIZE, SshOptions, known_hosts_name

__all__ = ["ChannelOpenError", "ChannelUpstream", "ForwardChannel", "ForwardingRefusedError",
           "MAX_PACKET", "PARAMIKO_LOG", "SSH_PORT", "SshConnection", "SshOptions", "WINDOW_SIZE",
           "connect", "known_hosts_name", "tcp_connect", "tune_socket"]

log = logging.getLogger(__name__)
# paramiko logs every failed handshake with a traceback at ERROR; this module classifies and
# reports those failures itself. Set this logger to DEBUG to see paramiko's own lines.
PARAMIKO_LOG = f"{__name__}.paramiko"
logging.getLogger(PARAMIKO_LOG).setLevel(logging.CRITICAL)

PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
_BROKEN = (paramiko.SSHException, EOFError, OSError)


class ChannelOpenError(TransientError):
    """The bastion could not open a channel to host:port (the tunnel may retry)."""


class ForwardingRefusedError(PermissionDeniedError):
    """The bastion refuses to forward to host:port (PermitOpen / AllowTcpForwarding)."""


def tcp_connect(host: str, port: int, timeout: float = 10.0) -> socket.socket:
    """A TCP socket to the bastion with TCP_NODELAY (no 40 ms Nagle stalls) and keepalives."""
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as exc:
        raise TransientError(f"cannot reach the bastion {host}:{port}: {_reason(exc)}",
                             hint="check the bastion address and that it is running") from None
    tune_socket(sock)
    return sock


def tune_socket(sock: socket.socket) -> None:
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)


def connect(sock: Any, options: SshOptions) -> "SshConnection":
    """Handshake, verify the host key, authenticate; return a ready connection.

    ``sock`` is closed when this fails.
    """
    transport = paramiko_internals.new_transport(sock, options.window_size, options.max_packet,
                                                 PARAMIKO_LOG)
    try:
        prefer_known_key_types(transport, options)
        _prefer_fast_ciphers(transport)
        _start(transport, options)
        verify_host_key(transport.get_remote_server_key(), options)
        _log_in(transport, options)
        _block_without_timeout(sock)
    except BaseException:
        _close_quietly(transport, sock)
        raise
    conn = SshConnection(transport, sock, options)
    log.info("ssh: connected to %s as %s (cipher %s)", options.host_label, options.user,
             transport.remote_cipher)
    return conn


def _start(transport: paramiko.Transport, options: SshOptions) -> None:
    transport.banner_timeout = options.timeout
    transport.handshake_timeout = options.timeout
    transport.auth_timeout = options.timeout
    try:
        transport.start_client(timeout=options.timeout)
    except _BROKEN as exc:
        raise TransientError(f"ssh handshake with {options.host_label} failed: {_reason(exc)}",
                             hint="the bastion may be restarting; dbtunneld retries") from None


def _log_in(transport: paramiko.Transport, options: SshOptions) -> None:
    try:
        authenticate(transport, options)
    except _BROKEN as exc:
        raise TransientError(f"ssh auth with {options.host_label} broke off: {_reason(exc)}") from None


def _block_without_timeout(sock: Any) -> None:
    """Once logged in, the reader thread blocks in recv() with no timeout: no poll() before
    every read and write, and no idle wake-ups. paramiko starts re-keying between messages
    by itself; ``SshConnection.close`` wakes a blocked reader with shutdown(); a frozen bastion
    is noticed by ``ping``. (The handshake keeps paramiko's timeouts.)"""
    sock.settimeout(None)


def _prefer_fast_ciphers(transport: paramiko.Transport) -> None:
    opts = transport.get_security_options()
    offered = tuple(opts.ciphers)
    first = tuple(c for c in PREFERRED_CIPHERS if c in offered)
    opts.ciphers = first + tuple(c for c in offered if c not in first)


class SshConnection:
    """A live SSH connection that hands out ``direct-tcpip`` channels."""

    def __init__(self, transport: paramiko.Transport, sock: Any, options: SshOptions) -> None:
        self._transport = transport
        self._sock = sock
        self._options = options

    @property
    def label(self) -> str:
        return self._options.host_label

    def open_channel(self, host: str, port: int, timeout: float = 10.0,
                     src: tuple[str, int] = ("127.0.0.1", 0)) -> ForwardChannel:
        """A ``direct-tcpip`` channel to host:port through the bastion."""
        try:
            chan = self._transport.open_channel(
                "direct-tcpip", (host, port), src, window_size=self._options.window_size,
                max_packet_size=self._options.max_packet, timeout=timeout)
        except paramiko.ChannelException as exc:
            raise _channel_error(exc, host, port, self.label) from None
        except _BROKEN as exc:
            raise TransientError(f"ssh to {self.label}: cannot open a channel to {host}:{port}: "
                                 f"{_reason(exc)}") from None
        self._ack_now()
        return ForwardChannel(chan)

    def _ack_now(self) -> None:
        """One SSH_MSG_IGNORE right after the open confirmation, so our ACK of it leaves at once.
        sshd turns TCP_NODELAY on only for interactive sessions (OpenSSH ``packet.c``
        ``ssh_packet_set_interactive``, called from ``session.c`` for a pty or X11), so on a
        forwarding connection Nagle holds the first CHANNEL_DATA (a MySQL server's greeting, sent
        as soon as sshd's connect completes) until the confirmation before it is acknowledged, and
        the client's kernel delays that ACK (40 ms on Linux, up to 100 ms on macOS): every new
        connection of a server-speaks-first protocol waited that long (64 ms instead of 21 for a
        PyMySQL connect here; ``python -m bench.greeting_first_byte``)."""
        try:
            self._transport.send_ignore(1)
        except _BROKEN:
            pass

    def ping(self, timeout: float) -> bool:
        """True when the server answers a keepalive request within ``timeout`` seconds (sent from
        this thread; the reader thread's reply sets an Event: no thread per ping)."""
        answered = threading.Event()
        return bool(self.keepalive(answered.set, wait=True)) and answered.wait(timeout)

    def keepalive(self, answered: Callable[[], None], wait: bool = False) -> bool | None:
        """Send one keepalive; ``answered()`` runs on paramiko's reader thread when the server
        replies (success or failure: either proves it alive). True: sent; False: the connection
        is gone; None: not sent, it would have had to wait (try again with ``wait=True`` off the
        engine loop; see ``paramiko_internals.send_keepalive``)."""
        return paramiko_internals.send_keepalive(self._transport, answered, wait)

    def on_closed(self, callback: Callable[[], None]) -> None:
        """``callback()`` once when the connection ends (paramiko's reader thread leaves: EOF,
        a reset, ``close``); at once if it has."""
        paramiko_internals.on_reader_end(self._transport, callback)

    def is_alive(self) -> bool:
        return bool(self._transport.is_active())

    def wait_closed(self, timeout: float | None = None) -> bool:
        """Block until the connection has died (or ``timeout``); True when it is gone."""
        self._transport.join(timeout)
        return not self._transport.is_alive()

    def close(self) -> None:
        _close_quietly(self._transport, self._sock)

    def __enter__(self) -> "SshConnection":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _channel_error(exc: paramiko.ChannelException, host: str, port: int, label: str) -> Exception:
    if exc.code == paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
        return ForwardingRefusedError(
            f"the bastion {label} refuses to forward to {host}:{port}",
            hint="the bastion's sshd must allow it (AllowTcpForwarding, PermitOpen)")
    return ChannelOpenError(f"the bastion {label} could not reach {host}:{port}: {exc.text}",
                            hint="check the cluster endpoint and the security group between bastion and cluster")


def _close_quietly(transport: paramiko.Transport, sock: Any) -> None:
    if isinstance(sock, socket.socket):
        try:
            sock.shutdown(socket.SHUT_RDWR)   # wakes paramiko's reader at once
        except OSError:
            pass
    try:
        transport.close()
    except Exception as exc:  # closing must never raise
        log.debug("ssh: close: %s", exc)
    try:
        sock.close()
    except Exception:
        pass


def _reason(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, (paramiko.SSHException, OSError)) and text:
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
