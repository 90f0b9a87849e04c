"""A ``direct-tcpip`` channel through the bastion: socket-like for simple callers
(``ForwardChannel``) and an upstream of ``dbtunneld.adapters.forward``'s loop (``ChannelUpstream``) whose
incoming bytes paramiko's reader thread writes straight into the client's socket."""

from __future__ import annotations

import socket
import threading
from typing import TYPE_CHECKING, ContextManager

import paramiko

from . import paramiko_internals as internals

if TYPE_CHECKING:
    from .forward_link import Link


class ForwardChannel:
    """A ``direct-tcpip`` channel: socket-like (recv / sendall / shutdown_write / settimeout /
    close), and ``forward_upstream()`` for a forwarding loop (``ChannelUpstream``)."""

    def __init__(self, chan: paramiko.Channel) -> None:
        self.chan = chan

    def recv(self, n: int) -> bytes:
        data: bytes = self.chan.recv(n)
        return data

    def sendall(self, data: bytes) -> None:
        self.chan.sendall(data)

    def shutdown_write(self) -> None:
        self.chan.shutdown_write()

    def settimeout(self, timeout: float | None) -> None:
        self.chan.settimeout(timeout)

    def close(self) -> None:
        self.chan.close()

    def forward_upstream(self) -> "ChannelUpstream":
        """This channel as an upstream of a forwarding loop (``dbtunneld.adapters.forward``)."""
        return ChannelUpstream(self.chan)


class ChannelUpstream:
    """A ``direct-tcpip`` channel driven by a forwarding loop (``dbtunneld.adapters.forward_link.Link``).

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
        self._link: Link | None = None

    @property
    def link(self) -> "Link":
        assert self._link is not None, "attach() first"
        return self._link

    def attach(self, link: "Link") -> None:
        self._link = link
        internals.redirect_channel_data(self.chan, self)
        if self._queue:
            link.poke()

    # -- paramiko's reader thread (through paramiko_internals) --

    def begin(self, early: bytes, ended: bool) -> None:
        with self._lock:
            if early:
                self._queue.append(early)        # e.g. a greeting that came with the open
            self._ended = ended

    def feed(self, data: bytes) -> None:
        sent = 0
        with self._lock:
            if self._failed:
                return
            if self._queue:
                self._queue.append(data)  # the loop was poked for the first of these
                return
            try:
                sent = self.link.client.send(data)      # non-blocking: the loop set it so
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
            self.link.poke()

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
            self.link.poke()

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
                sent = _send_nowait(self.link.client, chunk)
                self._queue = [chunk[sent:]] if sent < len(chunk) else []
            ack, self._ack = self._ack, 0
        if sent:
            ack += self._delivered(sent, from_reader=False)
        if ack:
            internals.send_window_adjust(self.chan, ack)

    def down_blocked(self) -> bool:
        return bool(self._queue)

    def down_ended(self) -> bool:
        with self._lock:
            return self._ended and not self._queue

    def send(self, data: bytes) -> int:
        total = 0
        while total < len(data):
            if internals.send_window(self.chan) <= 0:
                self._waiting_for_room = True
                if internals.send_window(self.chan) <= 0:   # an adjust may have come in between
                    break
                self._waiting_for_room = False
            sent: int = self.chan.send(data[total:] if total else data)
            if sent <= 0:
                raise EOFError("the channel is closed")
            total += sent
        return total

    def batch_key(self) -> paramiko.Transport:
        return self.chan.get_transport()

    def batch(self) -> ContextManager[None]:
        return internals.gathering(self.chan.get_transport())

    def shutdown_write(self) -> None:
        self.chan.shutdown_write()

    def close(self) -> None:
        internals.forget_sink(self.chan)
        self.chan.close()

    def _delivered(self, n: int, from_reader: bool) -> int:
        self.link.received += n
        ack = internals.consume_window(self.chan, n)
        if ack > 0 and from_reader:
            with self._lock:
                self._ack += ack
            self.link.poke()
            return 0
        return ack


def _send_nowait(sock: socket.socket, data: bytes) -> int:
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0
