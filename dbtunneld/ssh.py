"""SSH to the bastion with paramiko, tuned for forwarding: the adapter under the ssh transports.

Owns: connecting over a socket-like (TCP with TCP_NODELAY, an SSM stream, a ProxyCommand),
host-key verification (known_hosts or a key pinned in config; never auto-accepted), public-key
auth (key file, ssh-agent, or an ephemeral key sent through EC2 Instance Connect), a keepalive
ping that notices a frozen bastion, and ``direct-tcpip`` channels. Failures are raised as the
errors of ``dbtunneld.errors``; this module never retries (the tunnel owns retries).

Tuning (see STACK-NOTES, "SSH forwarding speed"): 16 MiB channel windows, 256 KiB packets,
aes128-gcm first, TCP_NODELAY, a reader thread that blocks without a timeout once logged in
(no poll() per read, no idle wake-ups), channel data written straight into the client's socket
by that thread, and the packets of one forwarding-loop turn written together
(``ChannelUpstream``, ``_GatheringPacketizer``; the loop is ``dbtunneld.forward``).
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import socket
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import paramiko

from .errors import HostKeyError, NeedsUserError, PermissionDeniedError, TransientError

log = logging.getLogger(__name__)
# paramiko logs every failed handshake with a traceback at ERROR; this module classifies and
# reports those failures itself. Set this logger to DEBUG to see paramiko's own lines.
PARAMIKO_LOG = f"{__name__}.paramiko"
logging.getLogger(PARAMIKO_LOG).setLevel(logging.CRITICAL)

WINDOW_SIZE = 16 * 1024 * 1024
MAX_PACKET = 256 * 1024
READ_SIZE = 256 * 1024
PREFERRED_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
SSH_PORT = 22


class ChannelOpenError(TransientError):
    """The bastion could not open a channel to host:port (the tunnel may retry)."""


class ForwardingRefusedError(PermissionDeniedError):
    """The bastion refuses to forward to host:port (PermitOpen / AllowTcpForwarding)."""


def _feed_channel_data(chan: paramiko.Channel, m: Any) -> None:
    """MSG_CHANNEL_DATA, as paramiko's ``Channel._feed``, but under the transport's sink lock so
    that ``ChannelUpstream.attach`` can swap the channel's buffer without losing a byte."""
    data = m if isinstance(m, bytes) else m.get_binary()
    with chan.transport.sink_lock:
        chan.in_buffer.feed(data)


def _window_adjust(chan: paramiko.Channel, m: Any) -> None:
    """MSG_CHANNEL_WINDOW_ADJUST, as paramiko's, then wake a forwarding loop waiting for room."""
    chan._window_adjust(m)
    upstream = getattr(chan, "dbtunneld_upstream", None)
    if upstream is not None:
        upstream.window_opened()


class _GatheringPacketizer(paramiko.Packetizer):
    """paramiko's Packetizer whose writes can be gathered: inside ``gather()`` (one forwarding
    loop turn) the packets the gathering thread sends go out in one socket write at its end.
    A packet from any other thread (a keepalive, a key exchange) first writes what was gathered,
    so bytes leave in sequence-number order. ``write_all`` runs under the packetizer's write lock."""

    def __init__(self, sock: Any) -> None:
        super().__init__(sock)
        self._gathered: list[bytes] | None = None
        self._gatherer = 0

    def write_all(self, out: bytes) -> None:
        if self._gathered is not None:
            if threading.get_ident() == self._gatherer:
                self._gathered.append(out)
                return
            self._write_gathered()
        super().write_all(out)

    def _write_gathered(self) -> None:
        if self._gathered:
            data = b"".join(self._gathered)
            self._gathered.clear()
            super().write_all(data)

    @contextlib.contextmanager
    def gather(self):
        """Gather this thread's packets until the outermost ``gather`` ends. Nested calls (a
        step run from inside a loop turn) join the open gathering: starting afresh would drop
        packets already numbered, and the server would stop at the next MAC."""
        lock = self._Packetizer__write_lock
        me = threading.get_ident()
        with lock:
            if self._gathered is not None and self._gatherer == me:
                nested = True
            else:
                nested = False
                self._gathered, self._gatherer = [], me
        try:
            yield
        finally:
            if not nested:
                with lock:
                    try:
                        self._write_gathered()
                    finally:
                        self._gathered = None


class _QuietTransport(paramiko.Transport):
    """paramiko's Transport, waking once a second while it logs in (default: ten times; after
    login it does not wake at all when idle), whose channel data can be delivered straight into
    a socket (``ChannelUpstream``) and whose packets can be
    written in batches (``_GatheringPacketizer``)."""

    _active_check_timeout = 1.0
    _channel_handler_table = {**paramiko.Transport._channel_handler_table,
                              paramiko.common.MSG_CHANNEL_DATA: _feed_channel_data,
                              paramiko.common.MSG_CHANNEL_WINDOW_ADJUST: _window_adjust}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, packetizer_class=_GatheringPacketizer, **kwargs)
        self.sink_lock = threading.Lock()
        self.packetizer.complete_handshake = _once(self.packetizer.complete_handshake)


def _once(fn: Callable[[], None]) -> Callable[[], None]:
    """paramiko calls ``Packetizer.complete_handshake`` after every message it reads; only the
    first call does anything (later ones cancel a finished timer: a lock and an Event.set each)."""
    done = False

    def first_time_only() -> None:
        nonlocal done
        if not done:
            done = True
            fn()
    return first_time_only


@dataclass(frozen=True)
class SshOptions:
    """Who to log in as, how to check the server, and the transport tuning."""

    user: str
    host_label: str                 # known_hosts name: "host", "[host]:2222" or an instance id
    key_file: str = ""
    use_agent: bool = True
    pkey: Any = None                # an in-memory paramiko.PKey (e.g. an ephemeral EIC key)
    host_key: str = ""              # pinned "ssh-ed25519 AAAA..." line
    known_hosts: str = ""           # path; default ~/.ssh/known_hosts
    timeout: float = 15.0
    window_size: int = WINDOW_SIZE
    max_packet: int = MAX_PACKET


def known_hosts_name(host: str, port: int = SSH_PORT) -> str:
    """How OpenSSH names a host in known_hosts."""
    return host if port == SSH_PORT else f"[{host}]:{port}"


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
    transport = _QuietTransport(sock, default_window_size=options.window_size,
                                default_max_packet_size=options.max_packet)
    transport.set_log_channel(PARAMIKO_LOG)
    transport.packetizer.set_log(transport.logger)
    try:
        _prefer_known_key_types(transport, options)
        _prefer_fast_ciphers(transport)
        _start(transport, options)
        verify_host_key(transport.get_remote_server_key(), options)
        _authenticate(transport, options)
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
    except (paramiko.SSHException, EOFError, OSError) as exc:
        raise TransientError(f"ssh handshake with {options.host_label} failed: {_reason(exc)}",
                             hint="the bastion may be restarting; dbtunneld retries") from None


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


def _prefer_known_key_types(transport: paramiko.Transport, options: SshOptions) -> None:
    """Ask for the host key types we can check first (as OpenSSH does)."""
    known = [k.get_name() for k in _expected_keys(options)]
    if not known:
        return
    opts = transport.get_security_options()
    offered = tuple(opts.key_types)
    wanted = [t for t in offered if t in known or _base_type(t) in known]
    opts.key_types = tuple(wanted) + tuple(t for t in offered if t not in wanted)


def _base_type(key_type: str) -> str:
    return "ssh-rsa" if key_type in ("rsa-sha2-256", "rsa-sha2-512") else key_type


# ---- host keys -------------------------------------------------------------------------------

def verify_host_key(key: paramiko.PKey, options: SshOptions) -> None:
    """Accept only a key pinned in config or listed in known_hosts; raise HostKeyError."""
    expected = _expected_keys(options)
    if any(_same_key(key, e) for e in expected):
        return
    seen = f"{key.get_name()} {key.fingerprint}"
    source = "bastion.host_key" if options.host_key else _known_hosts_path(options)
    if any(e.get_name() == key.get_name() for e in expected):
        raise HostKeyError(
            f"host key of {options.host_label} does not match {source}: the server sent {seen}",
            hint=("someone may be intercepting the connection, or the bastion was rebuilt; "
                  "verify the new key with your admin, then update " + source))
    raise HostKeyError(
        f"host key of {options.host_label} is not known ({seen}); it is never accepted blindly",
        hint=(f'verify the fingerprint with your admin, then pin it: bastion.host_key = '
              f'"{key.get_name()} {key.get_base64()}" (or add it to {_known_hosts_path(options)})'))


def _same_key(a: paramiko.PKey, b: paramiko.PKey) -> bool:
    return a.get_name() == b.get_name() and a.asbytes() == b.asbytes()


def _expected_keys(options: SshOptions) -> list[paramiko.PKey]:
    if options.host_key:
        return [parse_public_key(options.host_key)]
    return _known_host_keys(options)


def parse_public_key(line: str) -> paramiko.PKey:
    """Parse an OpenSSH public key line ("ssh-ed25519 AAAA... comment")."""
    parts = line.split()
    if len(parts) < 2:
        raise HostKeyError(f"bastion.host_key {line[:40]!r} is not an OpenSSH public key line",
                           hint='write it as in known_hosts: "ssh-ed25519 AAAA..."')
    try:
        return paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except Exception as exc:  # paramiko raises several types for a bad blob
        raise HostKeyError(f"bastion.host_key cannot be parsed: {exc}",
                           hint="copy the whole key line from ssh-keyscan or the admin") from None


def _known_hosts_path(options: SshOptions) -> str:
    return os.path.expanduser(options.known_hosts or "~/.ssh/known_hosts")


def _known_host_keys(options: SshOptions) -> list[paramiko.PKey]:
    path = _known_hosts_path(options)
    if not os.path.isfile(path):
        return []
    try:
        keys = paramiko.HostKeys(path).lookup(options.host_label) or {}
    except (OSError, paramiko.SSHException) as exc:
        log.warning("ssh: cannot read %s: %s", path, exc)
        return []
    return list(keys.values())


# ---- authentication --------------------------------------------------------------------------

def _authenticate(transport: paramiko.Transport, options: SshOptions) -> None:
    tried: list[str] = []
    for label, key in _candidate_keys(options):
        tried.append(label)
        try:
            transport.auth_publickey(options.user, key)
        except paramiko.AuthenticationException:
            continue
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise TransientError(f"ssh auth with {options.host_label} broke off: {_reason(exc)}") from None
        if transport.is_authenticated():
            return
    raise PermissionDeniedError(
        f"the bastion {options.host_label} refused user {options.user!r} "
        f"(tried: {', '.join(tried) or 'no keys'})",
        hint="check bastion.user and bastion.key_file, or load your key with `ssh-add`")


def _candidate_keys(options: SshOptions):
    if options.pkey is not None:
        yield "ephemeral key", options.pkey
    if options.key_file:
        yield options.key_file, load_private_key(options.key_file)
    if options.use_agent:
        for key in _agent_keys():
            yield f"agent key {key.fingerprint}", key


def load_private_key(path: str) -> paramiko.PKey:
    full = os.path.expanduser(path)
    try:
        return paramiko.PKey.from_path(full)
    except (paramiko.PasswordRequiredException, TypeError):  # TypeError: cryptography's "no password"
        raise NeedsUserError(f"the SSH key {path} is protected by a passphrase",
                             hint=f"load it into your agent (`ssh-add {path}`) and remove bastion.key_file") from None
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise NeedsUserError(f"cannot read the SSH key {path}: {exc}",
                             hint="point bastion.key_file at an OpenSSH private key") from None


def _agent_keys() -> list[paramiko.AgentKey]:
    if not os.environ.get("SSH_AUTH_SOCK"):
        return []
    try:
        agent = paramiko.Agent()
        return list(agent.get_keys())
    except paramiko.SSHException as exc:
        log.warning("ssh: the ssh-agent did not answer: %s", exc)
        return []


def ephemeral_key() -> paramiko.PKey:
    """A fresh in-memory Ed25519 key (never written to disk)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    return paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))


def send_ephemeral_key(eic_client: Any, instance_id: str, os_user: str,
                       classify: Callable[[Exception, str], Exception]) -> paramiko.PKey:
    """Make a key, push its public half with EC2 Instance Connect (valid 60 s), return it."""
    key = ephemeral_key()
    try:
        eic_client.send_ssh_public_key(InstanceId=instance_id, InstanceOSUser=os_user,
                                       SSHPublicKey=f"{key.get_name()} {key.get_base64()}")
    except Exception as exc:
        raise classify(exc, f"EC2 Instance Connect to {instance_id}") from None
    log.info("ssh: sent an ephemeral key for %s@%s through EC2 Instance Connect", os_user, instance_id)
    return key


# ---- the connection --------------------------------------------------------------------------

class SshConnection:
    """A live SSH connection that hands out ``direct-tcpip`` channels."""

    def __init__(self, transport: paramiko.Transport, sock: Any, options: SshOptions) -> None:
        self._transport = transport
        self._sock = sock
        self._options = options
        self._ping_lock = threading.Lock()

    @property
    def label(self) -> str:
        return self._options.host_label

    def open_channel(self, host: str, port: int, timeout: float = 10.0,
                     src: tuple[str, int] = ("127.0.0.1", 0)) -> "ForwardChannel":
        """A ``direct-tcpip`` channel to host:port through the bastion."""
        try:
            chan = self._transport.open_channel(
                "direct-tcpip", (host, port), src, window_size=self._options.window_size,
                max_packet_size=self._options.max_packet, timeout=timeout)
        except paramiko.ChannelException as exc:
            raise _channel_error(exc, host, port, self.label) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise TransientError(f"ssh to {self.label}: cannot open a channel to {host}:{port}: "
                                 f"{_reason(exc)}") from None
        return ForwardChannel(chan)

    def ping(self, timeout: float) -> bool:
        """True when the server answers a keepalive request within ``timeout`` seconds."""
        if not self.is_alive():
            return False
        with self._ping_lock:
            answered = threading.Event()
            worker = threading.Thread(target=self._ping_once, args=(answered,),
                                      name=f"ssh-ping {self.label}", daemon=True)
            worker.start()
            return answered.wait(timeout)

    def _ping_once(self, answered: threading.Event) -> None:
        try:
            self._transport.global_request("keepalive@openssh.com", wait=True)
        except Exception:  # a dying transport raises assorted errors: not an answer
            return
        if self._transport.is_active():
            answered.set()   # success or failure reply: either proves the server is alive

    def is_alive(self) -> bool:
        return self._transport.is_active()

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


# ---- forwarding: a channel whose incoming bytes go straight into the client's socket ------------

class ForwardChannel:
    """A ``direct-tcpip`` channel: socket-like (recv / sendall / shutdown_write / settimeout /
    close), and ``forward_upstream()`` for a forwarding loop (``ChannelUpstream``)."""

    def __init__(self, chan: paramiko.Channel) -> None:
        self.chan = chan

    def recv(self, n: int) -> bytes:
        return self.chan.recv(n)

    def sendall(self, data: bytes) -> None:
        self.chan.sendall(data)

    def shutdown_write(self) -> None:
        self.chan.shutdown_write()

    def settimeout(self, timeout: float | None) -> None:
        self.chan.settimeout(timeout)

    def close(self) -> None:
        self.chan.close()

    def forward_upstream(self) -> "ChannelUpstream":
        """This channel as an upstream of a forwarding loop (``dbtunneld.forward``)."""
        return ChannelUpstream(self.chan)


# ---- forwarding: a channel as an upstream of dbtunneld.forward's loop ---------------------------

class ChannelUpstream:
    """A ``direct-tcpip`` channel driven by a forwarding loop (``dbtunneld.forward.Link``).

    Download: paramiko's reader thread writes channel data straight into the client's socket
    (non-blocking; no thread hand-off per packet). What the socket does not take, or anything
    that arrives while older bytes wait, queues in order and the loop is poked once to write it
    when the socket drains. The window is acknowledged only for bytes the client took, so a
    client that stops reading stops the bastion after one window (back-pressure); the loop
    sends the adjusts (the reader thread must not: it would wait on itself during a key
    exchange). Upload: ``send`` takes what the window allows without blocking; a window adjust
    pokes the loop when it waits for room. The loop's sends of one turn go out in one write.
    """

    def __init__(self, chan: paramiko.Channel) -> None:
        self.chan = chan
        self._lock = threading.Lock()
        self._queue: list[bytes] = []
        self._ended = self._failed = False
        self._ack = 0
        self._waiting_for_room = False
        self._link: Any = None

    def attach(self, link: Any) -> None:
        self._link = link
        with self.chan.transport.sink_lock:
            early = self.chan.in_buffer.empty()    # e.g. a greeting that came with the open
            with self._lock:
                if early:
                    self._queue.append(early)
                self._ended = self.chan.eof_received or self.chan.closed
            self.chan.in_buffer = _ChannelSink(self)
        self.chan.dbtunneld_upstream = self
        if early:
            link.poke()

    # -- paramiko's reader thread (through _ChannelSink) --

    def feed(self, data: bytes) -> None:
        sent = 0
        with self._lock:
            if self._failed:
                return
            if self._queue:
                self._queue.append(data)  # the loop was poked for the first of these
                return
            try:
                sent = self._link.client.send(data)      # non-blocking: the loop set it so
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._failed = True
            if sent < len(data) and not self._failed:
                self._queue.append(data[sent:])
            poke = sent < len(data)
        if sent:
            self._delivered(sent, from_reader=True)
        if poke:
            self._link.poke()

    def peer_ended(self) -> None:
        with self._lock:
            self._ended = True
        if self._link is not None:
            self._link.poke()

    def queued(self) -> int:
        return sum(map(len, self._queue))

    def window_opened(self) -> None:
        if self._waiting_for_room:
            self._waiting_for_room = False
            self._link.poke()

    # -- the loop thread --

    def fileno_for_loop(self) -> None:
        return None

    def wants(self) -> int:
        return 0

    def pump_down(self) -> None:
        sent = 0
        with self._lock:                  # held while writing: the reader must not overtake
            if self._failed:
                raise OSError("the client's socket failed")
            if self._queue:
                chunk = self._queue[0] if len(self._queue) == 1 else b"".join(self._queue)
                sent = _send_nowait(self._link.client, chunk)
                self._queue = [chunk[sent:]] if sent < len(chunk) else []
            ack, self._ack = self._ack, 0
        if sent:
            ack += self._delivered(sent, from_reader=False)
        if ack:
            self._send_window_adjust(ack)

    def down_blocked(self) -> bool:
        return bool(self._queue)

    def down_ended(self) -> bool:
        with self._lock:
            return self._ended and not self._queue

    def send(self, data: bytes) -> int:
        total = 0
        while total < len(data):
            if self.chan.out_window_size <= 0:
                self._waiting_for_room = True
                if self.chan.out_window_size <= 0:   # an adjust may have come in between
                    break
                self._waiting_for_room = False
            sent = self.chan.send(data[total:] if total else data)
            if sent <= 0:
                raise EOFError("the channel is closed")
            total += sent
        return total

    def batch_key(self) -> Any:
        return self.chan.transport

    def batch(self) -> Any:
        return self.chan.transport.packetizer.gather()

    def shutdown_write(self) -> None:
        self.chan.shutdown_write()

    def close(self) -> None:
        self.chan.dbtunneld_upstream = None
        self.chan.close()

    def _delivered(self, n: int, from_reader: bool) -> int:
        self._link.received += n
        ack = self.chan._check_add_window(n)
        if ack > 0 and from_reader:
            with self._lock:
                self._ack += ack
            self._link.poke()
            return 0
        return max(ack, 0)

    def _send_window_adjust(self, ack: int) -> None:
        m = paramiko.Message()
        m.add_byte(paramiko.common.cMSG_CHANNEL_WINDOW_ADJUST)
        m.add_int(self.chan.remote_chanid)
        m.add_int(ack)
        try:
            self.chan.transport._send_user_message(m)
        except (paramiko.SSHException, EOFError, OSError):
            pass                          # the connection is going away; its end shows elsewhere


class _ChannelSink:
    """Stands in for paramiko's ``BufferedPipe`` as a channel's ``in_buffer``: data and the
    peer's end go to a ``ChannelUpstream`` (paramiko calls these with the channel's lock held)."""

    def __init__(self, upstream: ChannelUpstream) -> None:
        self._upstream = upstream

    def feed(self, data: bytes) -> None:
        self._upstream.feed(data)

    def close(self) -> None:
        self._upstream.peer_ended()

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        return b""                        # everything goes to the client's socket

    def read_ready(self) -> bool:
        return False

    def set_event(self, event: Any) -> None:
        pass

    def empty(self) -> bytes:
        return b""

    def __len__(self) -> int:
        return self._upstream.queued()


def _send_nowait(sock: socket.socket, data: bytes) -> int:
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0


def _channel_error(exc: paramiko.ChannelException, host: str, port: int, label: str) -> Exception:
    if exc.code == paramiko.common.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
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
