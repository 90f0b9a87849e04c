"""Every use of paramiko's non-public API in dbtunneld, in one module, pinned to tested versions.

The forwarding path (``dbtunneld.adapters.ssh_channel``) needs three things paramiko's public API does not
give: channel data delivered straight into the client's socket by paramiko's reader thread, the
channel window acknowledged only for bytes the client took (back-pressure), and the packets of one
forwarding-loop turn written in one socket write. The rest of dbtunneld uses paramiko's public API
only (``tests/test_paramiko_internals.py`` scans for it). What this module relies on, and why:

- ``Transport._channel_handler_table`` (class dict: message type -> ``Channel`` method): replaced
  for ``MSG_CHANNEL_DATA`` (as ``Channel._feed``, but under ``sink_lock``) and
  ``MSG_CHANNEL_WINDOW_ADJUST`` (then wake a forwarding loop waiting for room).
- ``Channel._window_adjust(m)``: paramiko's own window-adjust handling, called first.
- ``Channel.in_buffer`` (a ``BufferedPipe``: ``feed``/``close``/``empty``/``read``/``read_ready``/
  ``set_event``/``len``), ``Channel.eof_received``, ``Channel.closed``: the buffer is swapped for a
  sink (``redirect_channel_data``); paramiko calls ``feed`` and ``close`` on it from its reader.
- ``Channel.out_window_size``: how much may be sent without blocking (``send_window``).
- ``Channel._check_add_window(n)``: paramiko's receive-window accounting for bytes consumed; returns
  the adjust to send once over its threshold (``consume_window``).
- ``Channel.remote_chanid`` and ``Transport._send_user_message(m)``: the window adjust is sent from
  the loop thread (it waits while a key exchange runs, as paramiko's own ``Channel.recv`` does).
- ``paramiko.common.MSG_CHANNEL_DATA``, ``MSG_CHANNEL_WINDOW_ADJUST``, ``cMSG_CHANNEL_WINDOW_ADJUST``.
- ``Transport(packetizer_class=...)``, ``Transport.packetizer``, ``Packetizer.write_all(out)`` (runs
  under the name-mangled ``Packetizer.__write_lock``, an RLock): a Packetizer whose writes can be
  gathered during one loop turn (``gathering``).
- ``Packetizer.complete_handshake()``: paramiko calls it after every message it reads; only the
  first call does anything, so later ones are skipped (a lock and an Event.set each).
- ``Transport._active_check_timeout``: how often the reader wakes while logging in (1 s, not 0.1 s).
- ``Transport.run`` (the reader thread's body): wrapped, so its end is an event (``on_reader_end``),
  not something to poll ``is_active()`` for.
- ``Transport._parse_request_success`` / ``_parse_request_failure`` (bound into ``_handler_table``
  by ``Transport.__init__``): extended to answer our keepalives (``send_keepalive``) without
  paramiko's ``global_request(wait=True)``, which polls every 0.1 s on a thread of its own.
- ``Transport._send_user_message(m)`` / ``_send_message(m)``, ``clear_to_send`` (Event) and
  ``clear_to_send_lock``, ``Transport.sock``, ``paramiko.common.cMSG_GLOBAL_REQUEST``: a keepalive
  sent without waiting only when nothing is in its way (no key exchange, the write lock free,
  nothing gathered, room in the socket), else the caller sends it with waiting on a worker.
- ``Transport.stop_thread`` reads ``sock._closed`` of a socket-like carrier: carriers that are not
  sockets define it (``dbtunneld.adapters.ssm.plugin.PluginProxy._closed``).
- ``Transport._next_channel()`` (called by ``open_channel`` under ``Transport.lock`` on the opening
  thread) and ``Transport._channels`` (a map of *weak* references, id -> ``Channel``): when
  ``open_channel`` gives up (``Timeout opening channel.``) paramiko leaves the channel registered
  and the server's late confirmation makes it active, held by nothing. ``Channel.__del__`` then
  closes it, i.e. writes EOF and CLOSE to the transport's socket, on whatever thread the garbage
  collector runs on. Over SSM that can be the session's event-loop thread, the only reader of
  that socket: with the socket full it waits on itself forever, the SSM path freezes both ways
  and sshd ends the connection ("Timeout, client not responding"). So a channel given up on is
  kept (``abandoned``) and closed by us on a thread that may block (``close_abandoned``).

``SUPPORTED`` is the range these were checked against (``tests/test_paramiko_internals.py``,
``test_ssh.py`` and ``test_forward.py`` pass on each release in it; 3.4 lacks aes-gcm). setup.cfg
pins the same; outside it
``check_version`` logs a WARNING at the first connect, and the test fails on an upgrade.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import select
import socket
import threading
from typing import Any, Callable, ContextManager, Iterator, Protocol

import paramiko
import paramiko.common

from .upstream_end import UpstreamEnd

log = logging.getLogger(__name__)

SUPPORTED = (">=4.0", "<5.2")     # every release in it checked: 4.0.0, 5.0.0, 5.0.1, 5.1.0
_warned = False


# ---- the version pin --------------------------------------------------------------------------

def _release(text: str) -> tuple[int, ...]:
    parts = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


def version_supported(version: str, supported: tuple[str, str] = SUPPORTED) -> bool:
    """``version`` (e.g. "5.1.0") is inside the ``(">=A", "<B")`` range."""
    low, high = (_release(bound.lstrip("<>=")) for bound in supported)
    have = _release(version)
    return low <= have < high


def check_version(version: str | None = None) -> bool:
    """True when the installed paramiko is in ``SUPPORTED``; otherwise log a WARNING (once)."""
    global _warned
    version = version or paramiko.__version__
    if version_supported(version):
        return True
    if not _warned:
        _warned = True
        log.warning("paramiko %s is outside the tested range %s: dbtunneld's SSH forwarding relies "
                    "on paramiko internals (dbtunneld/adapters/paramiko_internals.py) and may corrupt or "
                    "stall data; install a tested version: pip install 'paramiko%s'",
                    version, ",".join(SUPPORTED), ",".join(SUPPORTED))
    return False


# ---- the transport: gathered writes, quiet login, channel data into sinks --------------------

class ChannelSink(Protocol):
    """Where a redirected channel's data goes (``ssh_channel.ChannelUpstream``). ``feed``,
    ``peer_ended`` and ``window_opened`` run on paramiko's reader thread."""

    def begin(self, early: bytes, ended: bool) -> None:
        """What arrived before the redirect, and whether the peer had ended (under the sink lock)."""

    def feed(self, data: bytes) -> None: ...

    def peer_ended(self) -> None: ...

    def queued(self) -> int: ...

    def window_opened(self) -> None: ...


def _sink_of(chan: paramiko.Channel) -> ChannelSink | None:
    sink: ChannelSink | None = getattr(chan, "dbtunneld_sink", None)
    return sink


def _feed_channel_data(chan: paramiko.Channel, m: Any) -> None:
    """MSG_CHANNEL_DATA, as paramiko's ``Channel._feed``, but under the transport's sink lock so
    that ``redirect_channel_data`` can swap the channel's buffer without losing a byte."""
    data = m if isinstance(m, bytes) else m.get_binary()
    with chan.transport.sink_lock:
        chan.in_buffer.feed(data)


def _window_adjust(chan: paramiko.Channel, m: Any) -> None:
    """MSG_CHANNEL_WINDOW_ADJUST, as paramiko's, then wake a forwarding loop waiting for room."""
    chan._window_adjust(m)
    sink = _sink_of(chan)
    if sink is not None:
        sink.window_opened()


class _GatheringPacketizer(paramiko.Packetizer):  # type: ignore[misc]  # paramiko is untyped
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
    def gather(self) -> Iterator[None]:
        """Gather this thread's packets until the outermost ``gather`` ends. Nested calls (a
        step run from inside a loop turn) join the open gathering: starting afresh would drop
        packets already numbered, and the server would stop at the next MAC."""
        lock = self._Packetizer__write_lock
        me = threading.get_ident()
        with lock:
            nested = self._gathered is not None and self._gatherer == me
            if not nested:
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


class _QuietTransport(paramiko.Transport):  # type: ignore[misc]  # paramiko is untyped
    """paramiko's Transport, waking once a second while it logs in (default: ten times; after
    login it does not wake at all when idle), whose channel data can be delivered into a sink
    and whose packets can be written in batches (``_GatheringPacketizer``)."""

    _active_check_timeout = 1.0
    _channel_handler_table = {**paramiko.Transport._channel_handler_table,
                              paramiko.common.MSG_CHANNEL_DATA: _feed_channel_data,
                              paramiko.common.MSG_CHANNEL_WINDOW_ADJUST: _window_adjust}

    def __init__(self, sock: Any, window_size: int, max_packet: int) -> None:
        super().__init__(sock, default_window_size=window_size, default_max_packet_size=max_packet,
                         packetizer_class=_GatheringPacketizer)
        self.sink_lock = threading.Lock()
        self.packetizer.complete_handshake = _once(self.packetizer.complete_handshake)
        self.reader_end = UpstreamEnd()
        self.keepalive_lock = threading.Lock()
        self.keepalive_waiters: collections.deque[Callable[[], None]] = collections.deque()
        self.abandoned: dict[int, paramiko.Channel] = {}   # opens given up on (under self.lock)
        self._opening = threading.local()                   # the id this thread's open took

    def open_channel(self, *args: Any, **kwargs: Any) -> paramiko.Channel:
        """paramiko's, except that a channel it gives up on (a timeout while the server is slow
        to confirm) is kept and closed by us (``close_abandoned``), never by the garbage
        collector on some other thread. Runs on a thread that may block, as paramiko's does."""
        self.close_abandoned()
        self._opening.chanid = None
        try:
            return super().open_channel(*args, **kwargs)
        except BaseException:
            self._abandon(self._opening.chanid)
            raise

    def _next_channel(self) -> int:
        chanid: int = super()._next_channel()
        self._opening.chanid = chanid
        return chanid

    def _abandon(self, chanid: int | None) -> None:
        if chanid is None:                    # failed before paramiko took an id
            return
        with self.lock:
            chan = self._channels.get(chanid)
            if chan is None:                  # refused: paramiko forgot it
                return
            self.abandoned[chanid] = chan
        self.close_abandoned()                # the confirmation may have come meanwhile

    def close_abandoned(self) -> None:
        """Close the channels given up on that the server has confirmed since (or forget those it
        refused); the rest wait for their answer. Blocks like ``Channel.close``."""
        with self.lock:
            settled = [chan for chanid, chan in self.abandoned.items()
                       if chan.active or chan.closed or self._channels.get(chanid) is not chan]
            for chan in settled:
                del self.abandoned[chan.chanid]
        for chan in settled:
            chan.close()

    def run(self) -> None:
        """paramiko's reader loop; its end (EOF, a broken socket, ``close``) is told at once."""
        try:
            super().run()
        finally:
            self.reader_end.end()

    def _parse_request_success(self, m: Any) -> None:
        super()._parse_request_success(m)
        self._keepalive_answered()

    def _parse_request_failure(self, m: Any) -> None:
        super()._parse_request_failure(m)
        self._keepalive_answered()

    def _keepalive_answered(self) -> None:
        """A reply to the oldest global request (replies come in order, RFC 4254 4): success or
        failure, the server is alive."""
        with self.keepalive_lock:
            answered = self.keepalive_waiters.popleft() if self.keepalive_waiters else None
        if answered is not None:
            answered()


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


def new_transport(sock: Any, window_size: int, max_packet: int, log_channel: str) -> paramiko.Transport:
    """A client Transport over ``sock`` (not started) with the tuning above; its log (and its
    packetizer's) goes to ``log_channel``. Warns once when paramiko is outside ``SUPPORTED``."""
    check_version()
    transport = _QuietTransport(sock, window_size, max_packet)
    transport.set_log_channel(log_channel)
    transport.packetizer.set_log(transport.logger)
    return transport


def on_reader_end(transport: paramiko.Transport, callback: Callable[[], None]) -> None:
    """``callback()`` once when the reader thread of a ``new_transport`` ends (at once if it has)."""
    transport.reader_end.add(callback)


def send_keepalive(transport: paramiko.Transport, answered: Callable[[], None], wait: bool) -> bool | None:
    """Send ``keepalive@openssh.com`` wanting a reply; ``answered()`` runs on the reader thread
    when it comes (no thread per ping). True: sent; False: the connection is gone; None (only
    with ``wait=False``): not sent, something is in the way (a key exchange, another writer,
    a full socket): send it again with ``wait=True`` on a thread that may block."""
    if not transport.is_active():
        return False
    m = paramiko.Message()
    m.add_byte(paramiko.common.cMSG_GLOBAL_REQUEST)
    m.add_string("keepalive@openssh.com")
    m.add_boolean(True)
    with transport.keepalive_lock:
        transport.keepalive_waiters.append(answered)
    try:
        if wait:
            transport._send_user_message(m)      # waits out a key exchange; drops it when dead
            sent = True
        else:
            sent = _send_now(transport, m)
    except (paramiko.SSHException, EOFError, OSError):
        sent = False
    if not sent:
        with transport.keepalive_lock:
            if answered in transport.keepalive_waiters:
                transport.keepalive_waiters.remove(answered)
        return None if transport.is_active() and not wait else False
    return bool(transport.is_active())


def _send_now(transport: paramiko.Transport, m: paramiko.Message) -> bool:
    """Send ``m`` only if that cannot block; False (nothing sent) otherwise."""
    if not transport.clear_to_send_lock.acquire(blocking=False):
        return False
    try:
        if not transport.clear_to_send.is_set():
            return False                                   # a key exchange runs
        packetizer = transport.packetizer
        write_lock = packetizer._Packetizer__write_lock
        if not write_lock.acquire(blocking=False):
            return False                                   # another thread is writing
        try:
            if packetizer._gathered or not _has_room(transport.sock):
                return False
            transport._send_message(m)
            return True
        finally:
            write_lock.release()
    finally:
        transport.clear_to_send_lock.release()


def _has_room(sock: Any) -> bool:
    """A real socket that takes a small write without blocking (a carrier that is not a socket: no)."""
    if not isinstance(sock, socket.socket) or sock.fileno() < 0:
        return False
    if hasattr(select, "poll"):
        poller = select.poll()
        poller.register(sock, select.POLLOUT)
        return bool(poller.poll(0))
    return bool(select.select([], [sock], [], 0)[1])


def gathering(transport: paramiko.Transport) -> ContextManager[None]:
    """Inside it, this thread's packets on ``transport`` leave in one socket write at its end."""
    cm: ContextManager[None] = transport.packetizer.gather()
    return cm


# ---- channels: data into a sink, the windows by hand ------------------------------------------

def redirect_channel_data(chan: paramiko.Channel, sink: ChannelSink) -> None:
    """From now on ``chan``'s data goes to ``sink.feed`` and its end to ``sink.peer_ended`` (on
    paramiko's reader thread); window adjusts call ``sink.window_opened``. What had arrived
    before (e.g. a greeting that came with the open) goes to ``sink.begin``, under the same lock
    as the reader's deliveries, so no byte overtakes it. Nothing is acknowledged by paramiko
    any more: the caller acknowledges with ``consume_window``."""
    with chan.get_transport().sink_lock:
        early = chan.in_buffer.empty()
        sink.begin(early, bool(chan.eof_received or chan.closed))
        chan.in_buffer = _BufferedPipeStandIn(sink)
    chan.dbtunneld_sink = sink


def forget_sink(chan: paramiko.Channel) -> None:
    """Window adjusts no longer reach the sink (the channel is being closed)."""
    chan.dbtunneld_sink = None


def send_window(chan: paramiko.Channel) -> int:
    """Bytes ``chan.send`` may send now without blocking (the peer's window)."""
    room: int = chan.out_window_size
    return room


def consume_window(chan: paramiko.Channel, n: int) -> int:
    """Count ``n`` bytes as consumed; the window adjust to send now (0 until over paramiko's
    threshold, or once the channel is closing)."""
    ack: int = chan._check_add_window(n)
    return max(ack, 0)


def send_window_adjust(chan: paramiko.Channel, n: int) -> None:
    """Open the peer's window for ``n`` more bytes. Waits while a key exchange runs: never call
    it on paramiko's reader thread (it would wait on itself)."""
    m = paramiko.Message()
    m.add_byte(paramiko.common.cMSG_CHANNEL_WINDOW_ADJUST)
    m.add_int(chan.remote_chanid)
    m.add_int(n)
    try:
        chan.get_transport()._send_user_message(m)
    except (paramiko.SSHException, EOFError, OSError):
        pass                          # the connection is going away; its end shows elsewhere


class _BufferedPipeStandIn:
    """Stands in for paramiko's ``BufferedPipe`` as a channel's ``in_buffer``: data and the
    peer's end go to a ``ChannelSink`` (paramiko calls these with the channel's lock held)."""

    def __init__(self, sink: ChannelSink) -> None:
        self._sink = sink

    def feed(self, data: bytes) -> None:
        self._sink.feed(data)

    def close(self) -> None:
        self._sink.peer_ended()

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        return b""                        # everything goes to the sink

    def read_ready(self) -> bool:
        return False

    def set_event(self, event: Any) -> None:
        pass

    def empty(self) -> bytes:
        return b""

    def __len__(self) -> int:
        return self._sink.queued()
