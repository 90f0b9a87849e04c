"""The data path of a tunnel: one selector loop thread (``Forwarder``) moves bytes between every
client socket and its upstream stream (an SSH channel or an smux stream's socket), with no thread
per client. This module holds the loop; one connection is a ``forward_link.Link``, its far side a
``forward_upstream.Upstream``.

Shaped like asyncssh's ``forward.py`` (a peer per side, each pausing the other's reading while
its own writes are backed up). Everything an upstream sends during one loop turn is written in
one go (``Upstream.batch``, gathered by a ``Turn``: for SSH one socket write for all the packets
of a turn). Other threads talk to the loop only through ``Forwarder.call`` (one wake-up byte per
batch of calls); an idle loop sleeps in select() without a timeout.
"""

from __future__ import annotations

import contextlib
import logging
import selectors
import socket
import threading
from typing import Any, Callable

from .command_watch import CommandWatch
from .forward_link import Link
from .forward_upstream import READ_SIZE, Turn, Upstream

log = logging.getLogger(__name__)

R = selectors.EVENT_READ


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
        self._calls: list[tuple[Callable[..., None], tuple[Any, ...]]] = []
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

    @property
    def closing(self) -> bool:
        """``close`` was called or the loop has gone: new links are cut at once."""
        return self._closed or self._ended

    # ---- the loop thread ----------------------------------------------------------------------

    def adopt(self, link: Link) -> None:
        """Count ``link`` among the loop's (cut when the loop ends)."""
        self._links.add(link)

    def release(self, link: Link) -> None:
        self._links.discard(link)

    def _run(self) -> None:
        if self._on_start is not None:
            self._on_start()
        try:
            while not self._closed:
                events = self._sel.select()
                with Turn() as turn:
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

    def _turn(self, events: list[tuple[selectors.SelectorKey, int]], turn: Turn) -> None:
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
