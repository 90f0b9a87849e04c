"""One forwarded connection (``Link``): a non-blocking client socket and its ``Upstream``, pumped on
the forwarding loop's thread. Upload: the client is read (256 KiB at most) and sent to the upstream
as far as it takes without blocking; the rest waits and the client is not read again until it is
gone (back-pressure). Download: the upstream delivers into the client (``Upstream.pump_down``);
bytes the client does not take wait in the upstream, which then stops taking more. Half-closes
pass through; an error on either side cuts both. With a ``CommandWatch`` a link can divert its
client to the watch's handler for one command and take it back."""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from typing import TYPE_CHECKING, Callable

from .command_watch import CommandWatch
from .forward_upstream import Turn, Upstream, close_quietly, shutdown_write

if TYPE_CHECKING:
    from .forward import Forwarder

log = logging.getLogger(__name__)

R, W = selectors.EVENT_READ, selectors.EVENT_WRITE
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class Link:
    """One client connection and its upstream; lives on the loop thread (``abort``, ``poke``
    and ``received`` may be used from any thread).

    With ``commands`` (a ``CommandWatch``) the upload goes through it; when it stops at a watched
    command the link is diverted: once what came before has gone up and the download is idle,
    the client leaves the loop, the loop relays a socket pair's end instead, and the watch's
    handler talks to the client and (through the pair's other end) to the upstream with blocking
    sockets on its own thread; then the client comes back (``_undivert``)."""

    def __init__(self, loop: Forwarder, client: socket.socket, upstream: Upstream,
                 on_end: Callable[["Link"], None], label: str, commands: CommandWatch | None = None) -> None:
        self.loop = loop
        self.client = client
        self.upstream = upstream
        self.label = label
        self.generation = -1              # set by the tunnel: which upstream this link rides on
        self.received = 0                 # bytes delivered to the client
        self._on_end = on_end
        self._up_pending = b""            # read from the client, not yet taken by the upstream
        self._client_eof = False          # the client closed its sending side
        self._up_shut = False             # ... and that was passed on
        self._down_shut = False           # the upstream's end was passed on to the client
        self._poked = False
        self._done = False
        self._commands = commands
        self._real_client: socket.socket | None = None   # while diverted: the client, off the loop
        self._up_fd = False               # the upstream has a socket the loop watches
        self._watching = [-1, -1]         # what the loop was last told to wait for: client, upstream

    # -- any thread --

    @property
    def ended(self) -> bool:
        return self._done

    def poke(self) -> None:
        """The upstream has news (data, window, end) for the loop; one wake-up per turn."""
        if not self._poked:
            self._poked = True
            self.loop.call(self._on_poke)

    def abort(self) -> None:
        """Cut both ends (the client sees the connection drop)."""
        with contextlib.suppress(OSError):
            self.client.shutdown(socket.SHUT_RDWR)
        self.loop.call(self._finish, True)

    # -- the loop thread --

    def start(self) -> None:
        if self.loop.closing:
            return self._finish(True)
        self.client.setblocking(False)
        self.loop.adopt(self)
        try:
            self.upstream.attach(self)
        except Exception as exc:
            log.debug("%s: %s", self.label, exc)
            return self._finish(True)
        self._up_fd = self.upstream.fileno_for_loop() is not None
        self._step(None)

    def _on_poke(self) -> None:
        self._poked = False
        if not self._done:
            self._step(None)

    def ready(self, side: str, mask: int, turn: Turn) -> None:
        if self._done:
            return
        if side == "client":
            # only the client is readable: a socket upstream has nothing new (the loop would have
            # said so); an upstream without a socket is pumped at each step (its news is a poke)
            self._step(turn, client_readable=bool(mask & R), pump=bool(mask & W) or not self._up_fd)
        else:
            self._step(turn)

    def _step(self, turn: Turn | None, client_readable: bool = False, pump: bool = True) -> None:
        try:
            if turn is None:
                with Turn() as t:
                    self._move(t, client_readable, pump)
            else:
                self._move(turn, client_readable, pump)
        except Exception as exc:             # socket, paramiko and stream errors all cut the link
            if not isinstance(exc, _GONE + (EOFError,)):
                log.debug("%s: %s: %s", self.label, type(exc).__name__, exc)
            return self._finish(True)
        if self._up_shut and self._down_shut:
            return self._finish(False)
        self._rewatch()

    def _move(self, turn: Turn, client_readable: bool, pump: bool = True) -> None:
        if pump:
            self.upstream.pump_down()
        if self.upstream.down_ended() and not self._down_shut:
            self._down_shut = True
            shutdown_write(self.client)
        if self._up_pending:
            self._send_up(turn)
        if client_readable and not self._up_pending and not self._client_eof and not self._holding():
            self._read_client(turn)
        if self._holding():
            if not self._up_pending and not self.upstream.down_blocked():
                self._divert()
            return
        if self._client_eof and not self._up_pending and not self._up_shut:
            self._up_shut = True
            self.upstream.shutdown_write()

    def _read_client(self, turn: Turn) -> None:
        data = self.loop.recv(self.client)
        if data is None:
            return
        watch = self._commands
        if not data:
            self._client_eof = True
            self._up_pending = watch.flush() if watch is not None and self._real_client is None else b""
            if self._up_pending:
                self._send_up(turn)
            return
        if watch is not None and self._real_client is None:
            data = watch.feed(data)
        self._up_pending = data
        if data:
            self._send_up(turn)

    # -- diverting the client to the command watch's handler

    def _holding(self) -> bool:
        return self._commands is not None and self._commands.held is not None and self._real_client is None

    def _divert(self) -> None:
        assert self._commands is not None and self._commands.held is not None
        held = self._commands.held
        self._unwatch_client()
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        self._real_client, self.client = self.client, ours
        self._real_client.setblocking(True)
        threading.Thread(target=self._run_handler, args=(self._real_client, theirs, held),
                         name=f"{self.loop.name}-command", daemon=True).start()

    def _run_handler(self, client: socket.socket, upstream: socket.socket, held: bytes) -> None:
        assert self._commands is not None
        try:
            rest = self._commands.handler(client, upstream, held)
        except Exception as exc:
            log.debug("%s: command handler ended the connection: %s: %s", self.label, type(exc).__name__, exc)
            close_quietly(upstream)
            self.loop.call(self._finish, True)
            return
        self.loop.call(self._undivert, upstream, rest)

    def _undivert(self, upstream_end: socket.socket, rest: bytes) -> None:
        real = self._real_client
        if self._done or real is None:
            close_quietly(upstream_end)
            return
        self._unwatch_client()
        close_quietly(self.client)
        close_quietly(upstream_end)
        self.client, self._real_client = real, None
        real.setblocking(False)
        assert self._commands is not None
        self._commands.reset()
        if rest:
            self._up_pending = self._commands.feed(rest)
        self._step(None)

    def _send_up(self, turn: Turn) -> None:
        turn.join(self.upstream)
        sent = self.upstream.send(self._up_pending)
        self._up_pending = self._up_pending[sent:]

    def _unwatch_client(self) -> None:
        """The loop stops watching the client socket (it is about to be swapped)."""
        self.loop.unwatch(self.client)
        self._watching[0] = -1

    def _rewatch(self) -> None:
        """Tell the loop what to wait for on each side (only when that changed: the last
        setting of each side is kept, ``_watching``)."""
        events = 0
        if not self._client_eof and not self._up_pending and not self._holding():
            events |= R
        if self.upstream.down_blocked():
            events |= W
        if events != self._watching[0]:
            self.loop.watch(self.client, events, (self, "client"))
            self._watching[0] = events
        if self._up_fd:
            up = self.upstream.wants() | (W if self._up_pending else 0)
            if up != self._watching[1]:
                self.loop.watch(self.upstream, up, (self, "upstream"))
                self._watching[1] = up

    def _finish(self, cut: bool) -> None:
        if self._done:
            return
        self._done = True
        self.loop.release(self)
        self.loop.unwatch(self.client)
        if self._up_fd:
            self.loop.unwatch(self.upstream)
        if cut:
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_RDWR)
        close_quietly(self.upstream)
        close_quietly(self.client)
        if self._real_client is not None:
            with contextlib.suppress(OSError):
                self._real_client.shutdown(socket.SHUT_RDWR)
            close_quietly(self._real_client)
        try:
            self._on_end(self)
        except Exception:
            log.exception("%s: end of link handler failed", self.label)

