"""The far side of a forwarding link: the ``Upstream`` protocol the loop pumps through, its socket
implementation (``SocketUpstream``: an smux stream's socket, a plain TCP stream; the SSH channel's is
``ssh_channel.ChannelUpstream``), ``upstream_for`` choosing one, ``Turn`` (the sends of one loop turn
batched per SSH connection), and the non-blocking socket helpers both sides of a link use."""

from __future__ import annotations

import contextlib
import errno
import logging
import selectors
import socket
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    from .forward_link import Link

log = logging.getLogger(__name__)

R = selectors.EVENT_READ
READ_SIZE = 256 * 1024             # the forwarding loop reads at most this much at a time


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


class Turn:
    """One loop turn: the batches opened by the sends to upstreams during that turn, flushed at its
    end (``Upstream.batch``)."""

    def __init__(self) -> None:
        self._stack: contextlib.ExitStack | None = None     # made by the first batch of the turn
        self._keys: set[Any] = set()

    def join(self, upstream: Upstream) -> None:
        key = upstream.batch_key()
        if key is not None and key not in self._keys:
            self._keys.add(key)
            if self._stack is None:
                self._stack = contextlib.ExitStack()
            self._stack.enter_context(upstream.batch())

    def __enter__(self) -> "Turn":
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._stack is None:
            return
        try:
            self._stack.close()            # writes what the batches gathered
        except Exception as exc:           # the connection died: its owner notices and cuts the links
            log.debug("flushing a batch failed: %s: %s", type(exc).__name__, exc)


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
        short = False
        while True:
            if self._pending:
                sent = send_nowait(client, self._pending)
                link.received += sent
                self._pending = self._pending[sent:]
                if self._pending:
                    return
            if self._eof or short:         # a short read took all there was: the loop says when more comes
                return
            data = link.loop.recv(self.sock)
            if data is None:
                return
            if not data:
                self._eof = True
                return
            if self._inspect is not None:
                self._inspect(data)
            self._pending, short = data, len(data) < READ_SIZE

    def down_blocked(self) -> bool:
        return bool(self._pending)

    def down_ended(self) -> bool:
        return self._eof and not self._pending

    def send(self, data: bytes) -> int:
        return send_nowait(self.sock, data)

    def batch_key(self) -> None:
        return None

    def batch(self) -> Any:
        """Never called: the loop batches only upstreams with a ``batch_key``."""
        return contextlib.nullcontext()

    def shutdown_write(self) -> None:
        shutdown_write(self.sock)

    def close(self) -> None:
        self.sock.close()


def upstream_for(stream: Any) -> Upstream:
    """The loop's view of what ``Transport.open_channel`` returned."""
    if hasattr(stream, "forward_upstream"):
        upstream: Upstream = stream.forward_upstream()
        return upstream
    if isinstance(stream, socket.socket):
        return SocketUpstream(stream)
    raise TypeError(f"cannot forward over {type(stream).__name__}")


def send_nowait(sock: socket.socket, data: bytes) -> int:
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EWOULDBLOCK):
            return 0
        raise


def shutdown_write(stream: Any) -> None:
    try:
        if hasattr(stream, "shutdown_write"):
            stream.shutdown_write()
        else:
            stream.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def close_quietly(stream: Any) -> None:
    try:
        stream.close()
    except Exception:
        pass
