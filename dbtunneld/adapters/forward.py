"""The data path of a tunnel: one selector loop thread moves bytes between every client socket
and its upstream stream (an SSH channel or an smux stream's socket), with no thread per client.

Shaped like asyncssh's ``forward.py`` (a peer per side, each pausing the other's reading while
its own writes are backed up): a ``Link`` pairs a non-blocking client socket with an
``Upstream``. Upload: the loop reads the client (256 KiB at most) and sends to the upstream as
much as it takes without blocking (an SSH channel's window; a socket's buffer); the rest waits
and the client is not read again until it is gone (back-pressure). Download: the upstream
delivers into the client (``Upstream.pump_down``); bytes the client socket does not take wait in
the upstream, which then stops taking more (an SSH channel stops acknowledging its window; an
smux socket is not read). Half-closes pass through; an error on either side cuts both.

Everything an upstream sends during one loop turn is written in one go (``Upstream.batch``:
for SSH one socket write for all the packets of a turn). Other threads talk to the loop only
through ``Forwarder.call`` (one wake-up byte per batch of calls); an idle loop sleeps in
select() without a timeout.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
import threading
from typing import Any, Callable, Protocol

from .command_watch import CommandWatch

log = logging.getLogger(__name__)

READ_SIZE = 256 * 1024
R, W = selectors.EVENT_READ, selectors.EVENT_WRITE
_GONE = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError)


class Upstream(Protocol):
    """What the loop needs from the far side of a link (``SocketUpstream``; ``ssh.ChannelUpstream``)."""

    def attach(self, link: "Link") -> None:
        """Start delivering into ``link.client`` (called on the loop thread)."""

    def fileno_for_loop(self) -> int | None:
        """A socket the loop should watch (``wants()`` says for what), or None."""

    def wants(self) -> int:
        """selectors events for ``fileno_for_loop``."""

    def pump_down(self) -> None:
        """Move what can be moved into the client now, without blocking."""

    def down_blocked(self) -> bool:
        """Bytes wait for the client socket to take them."""

    def down_ended(self) -> bool:
        """The far side ended and everything was delivered."""

    def send(self, data: bytes) -> int:
        """Send as much of ``data`` as goes without blocking; the count."""

    def batch_key(self) -> Any:
        """What this upstream's sends are batched by (its SSH connection), or None."""

    def batch(self) -> Any:
        """A context manager around one loop turn's sends on everything of ``batch_key``."""

    def shutdown_write(self) -> None: ...

    def close(self) -> None: ...


class Forwarder:
    """One loop thread for all of a tunnel's links; ``start``/``close`` are idempotent."""

    def __init__(self, name: str, on_start: Callable[[], None] | None = None) -> None:
        self.name = name
        self._on_start = on_start
        self._sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._sel.register(self._wake_r, R, None)
        self._lock = threading.Lock()
        self._calls: list[tuple[Callable[..., None], tuple]] = []
        self._woken = False
        self._links: set[Link] = set()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._ended = False               # the loop thread has gone: calls run inline
        self._buffer = memoryview(bytearray(READ_SIZE))

    def recv(self, sock: socket.socket) -> bytes | None:
        """What ``sock`` has (b"" at its end; None when nothing yet), read into the loop's one
        buffer: recv(256 KiB) would allocate (mmap) 256 KiB for every small message."""
        try:
            n = sock.recv_into(self._buffer)
        except (BlockingIOError, InterruptedError):
            return None
        return self._buffer[:n].tobytes()

    def start(self) -> None:
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def add(self, client: socket.socket, upstream: Upstream, on_end: Callable[["Link"], None],
            label: str = "", generation: int = -1, commands: CommandWatch | None = None) -> "Link":
        """Forward between ``client`` and ``upstream`` until both are done; then ``on_end(link)``
        (on the loop thread; both ends are closed by then). ``commands``: see ``Link``."""
        link = Link(self, client, upstream, on_end, label, commands)
        link.generation = generation
        self.call(link.start)
        return link

    def call(self, fn: Callable[..., None], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop thread soon (any thread may call this; once the loop
        has ended, at once in the caller's thread)."""
        with self._lock:
            inline = self._ended
            if not inline:
                self._calls.append((fn, args))
                wake, self._woken = not self._woken, True
        if inline:
            fn(*args)
            return
        if wake:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")

    def close(self) -> None:
        """Cut every link and end the loop."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        self.call(lambda: None)
        thread = self._thread
        if thread is None:                # never started: nothing to wait for
            with self._lock:
                self._ended = True
            self._run_calls()
        elif thread is not threading.current_thread():
            thread.join(5)

    # ---- the loop thread ----------------------------------------------------------------------

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        try:
            while not self._closed:
                events = self._sel.select()
                with _Turn() as turn:
                    self._turn(events, turn)
        finally:
            for link in list(self._links):
                link.abort()
            with self._lock:
                self._ended = True
            self._run_calls()
            self._sel.close()
            self._wake_r.close()
            self._wake_w.close()

    def _turn(self, events: list, turn: "_Turn") -> None:
        for key, mask in events:
            if key.data is None:
                self._drain_wake()
                self._run_calls()
            else:
                link, side = key.data
                link.ready(side, mask, turn)

    def _drain_wake(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wake_r.recv(4096):
                pass

    def _run_calls(self) -> None:
        with self._lock:
            calls, self._calls = self._calls, []
            self._woken = False
        for fn, args in calls:
            try:
                fn(*args)
            except Exception:
                log.exception("%s: a forwarding step failed", self.name)

    def watch(self, sock: Any, events: int, data: Any) -> None:
        """Set what the loop waits for on ``sock`` (0: nothing)."""
        key = self._sel.get_map().get(sock.fileno()) if sock.fileno() >= 0 else None
        if key is None:
            if events:
                self._sel.register(sock, events, data)
        elif not events:
            self._sel.unregister(sock)
        elif key.events != events:
            self._sel.modify(sock, events, data)

    def unwatch(self, sock: Any) -> None:
        if self._sel.get_map() is None:   # closed
            return
        with contextlib.suppress(KeyError, ValueError, OSError):
            self._sel.unregister(sock)


class _Turn:
    """One loop turn: the batches opened by the sends of that turn, flushed at its end."""

    def __init__(self) -> None:
        self._stack = contextlib.ExitStack()
        self._keys: set[Any] = set()

    def join(self, upstream: Upstream) -> None:
        key = upstream.batch_key()
        if key is not None and key not in self._keys:
            self._keys.add(key)
            self._stack.enter_context(upstream.batch())

    def __enter__(self) -> "_Turn":
        return self

    def __exit__(self, *exc_info: object) -> None:
        try:
            self._stack.close()            # writes what the batches gathered
        except Exception as exc:           # the connection died: its owner notices and cuts the links
            log.debug("flushing a batch failed: %s: %s", type(exc).__name__, exc)


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
        if self.loop._closed or self.loop._ended:
            return self._finish(True)
        self.client.setblocking(False)
        self.loop._links.add(self)
        try:
            self.upstream.attach(self)
        except Exception as exc:
            log.debug("%s: %s", self.label, exc)
            return self._finish(True)
        self._step(None)

    def _on_poke(self) -> None:
        self._poked = False
        if not self._done:
            self._step(None)

    def ready(self, side: str, mask: int, turn: "_Turn") -> None:
        if self._done:
            return
        self._step(turn, client_readable=side == "client" and bool(mask & R))

    def _step(self, turn: "_Turn | None", client_readable: bool = False) -> None:
        try:
            with _Turn() if turn is None else contextlib.nullcontext(turn) as t:
                self._move(t, client_readable)
        except Exception as exc:             # socket, paramiko and stream errors all cut the link
            if not isinstance(exc, _GONE + (EOFError,)):
                log.debug("%s: %s: %s", self.label, type(exc).__name__, exc)
            return self._finish(True)
        if self._up_shut and self._down_shut:
            return self._finish(False)
        self._rewatch()

    def _move(self, turn: "_Turn", client_readable: bool) -> None:
        self.upstream.pump_down()
        if self.upstream.down_ended() and not self._down_shut:
            self._down_shut = True
            _shutdown_write(self.client)
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

    def _read_client(self, turn: "_Turn") -> None:
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
        self.loop.unwatch(self.client)
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
            _close(upstream)
            self.loop.call(self._finish, True)
            return
        self.loop.call(self._undivert, upstream, rest)

    def _undivert(self, upstream_end: socket.socket, rest: bytes) -> None:
        real = self._real_client
        if self._done or real is None:
            _close(upstream_end)
            return
        self.loop.unwatch(self.client)
        _close(self.client)
        _close(upstream_end)
        self.client, self._real_client = real, None
        real.setblocking(False)
        assert self._commands is not None
        self._commands.reset()
        if rest:
            self._up_pending = self._commands.feed(rest)
        self._step(None)

    def _send_up(self, turn: "_Turn") -> None:
        turn.join(self.upstream)
        sent = self.upstream.send(self._up_pending)
        self._up_pending = self._up_pending[sent:]

    def _rewatch(self) -> None:
        events = 0
        if not self._client_eof and not self._up_pending and not self._holding():
            events |= R
        if self.upstream.down_blocked():
            events |= W
        self.loop.watch(self.client, events, (self, "client"))
        up = self.upstream.fileno_for_loop()
        if up is not None:
            self.loop.watch(self.upstream, self.upstream.wants() | (W if self._up_pending else 0),
                            (self, "upstream"))

    def _finish(self, cut: bool) -> None:
        if self._done:
            return
        self._done = True
        self.loop._links.discard(self)
        self.loop.unwatch(self.client)
        if self.upstream.fileno_for_loop() is not None:
            self.loop.unwatch(self.upstream)
        if cut:
            with contextlib.suppress(OSError):
                self.client.shutdown(socket.SHUT_RDWR)
        _close(self.upstream)
        _close(self.client)
        if self._real_client is not None:
            with contextlib.suppress(OSError):
                self._real_client.shutdown(socket.SHUT_RDWR)
            _close(self._real_client)
        try:
            self._on_end(self)
        except Exception:
            log.exception("%s: end of link handler failed", self.label)


class SocketUpstream:
    """A socket as the upstream (an smux stream's end of its socket pair, a plain TCP stream);
    ``inspect``, when given, sees each chunk received from it (e.g. ``ssm.failover.ReadOnlyWatch``)."""

    def __init__(self, sock: socket.socket, inspect: Callable[[bytes], None] | None = None) -> None:
        self.sock = sock
        self._inspect = inspect
        self._link: Link | None = None
        self._pending = b""               # from the upstream, not yet taken by the client
        self._eof = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def fileno_for_loop(self) -> int:
        return self.sock.fileno()

    def attach(self, link: Link) -> None:
        self._link = link
        self.sock.setblocking(False)

    def wants(self) -> int:
        return 0 if self._pending or self._eof else R

    def pump_down(self) -> None:
        link = self._link
        assert link is not None, "pump_down before attach"
        client = link.client
        while True:
            if self._pending:
                sent = _send(client, self._pending)
                link.received += sent
                self._pending = self._pending[sent:]
                if self._pending:
                    return
            if self._eof:
                return
            data = link.loop.recv(self.sock)
            if data is None:
                return
            if not data:
                self._eof = True
                return
            if self._inspect is not None:
                self._inspect(data)
            self._pending = data

    def down_blocked(self) -> bool:
        return bool(self._pending)

    def down_ended(self) -> bool:
        return self._eof and not self._pending

    def send(self, data: bytes) -> int:
        return _send(self.sock, data)

    def batch_key(self) -> None:
        return None

    def batch(self) -> Any:
        """Never called: the loop batches only upstreams with a ``batch_key``."""
        return contextlib.nullcontext()

    def shutdown_write(self) -> None:
        _shutdown_write(self.sock)

    def close(self) -> None:
        self.sock.close()


def upstream_for(stream: Any) -> Upstream:
    """The loop's view of what ``Transport.open_channel`` returned."""
    if hasattr(stream, "forward_upstream"):
        return stream.forward_upstream()
    if isinstance(stream, socket.socket):
        return SocketUpstream(stream)
    raise TypeError(f"cannot forward over {type(stream).__name__}")


def _send(sock: socket.socket, data: bytes) -> int:
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        raise


def _shutdown_write(stream: Any) -> None:
    try:
        if hasattr(stream, "shutdown_write"):
            stream.shutdown_write()
        else:
            stream.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _close(stream: Any) -> None:
    try:
        stream.close()
    except Exception:
        pass
