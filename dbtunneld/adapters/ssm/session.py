"""Blocking faces of an SSM session, each backed by its own event-loop thread.

* ``SsmSession``: an ``AWS-StartSSHSession`` byte stream exposed as ``.sock``, one end of a
  socket pair, so ``paramiko.Transport(session.sock)`` runs SSH over it unchanged.
* ``PortForwardSession``: an ``AWS-StartPortForwardingSessionToRemoteHost`` session;
  ``open_stream()`` returns a new socket per client connection (one smux stream each).

Whoever creates a session owns it: ``close()`` (idempotent, also on ``with`` exit) stops the
relay, sends the TerminateSession flag, calls TerminateSession and joins the thread. When the
session ends underneath (service terminated it, resume failed), ``closed`` is set and
``last_error`` says why; the owner decides whether to start a new one.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import dataclasses
import logging
import socket
import threading
import weakref
from collections.abc import Callable, Coroutine
from typing import Any, Self, TypeVar

from ...core.errors import ClosedError, DbtunneldError, NeedsUserError, TransientError
from ..upstream_end import UpstreamEnd
from .api import Grant, SsmApi
from .channel import DataChannel
from .channel_handshake import Handshake
from .channel_options import ChannelOptions
from .smux import KEEPALIVE_INTERVAL, MuxClient, stream_socket_pair

log = logging.getLogger(__name__)

T = TypeVar("T")

MUX_MIN_AGENT = "3.0.196.0"  # agents above it multiplex port-forward sessions with smux
MUX_KEEPALIVE_UNTIL_AGENT = "3.1.1511.0"  # agents up to it keep smux keepalive on: send NOPs
RELAY_READ = 256 * 1024
DELIVERY_HIGH_WATER = 4 << 20


def version_tuple(version: str) -> tuple[int, ...]:
    parts = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class _LoopThread:
    """An asyncio loop on a daemon thread; the owner submits coroutines and stops it."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._main, name=name, daemon=True)
        self._thread.start()

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()
        pending = asyncio.all_tasks(self.loop)
        for task in pending:
            task.cancel()
        self.loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coro`` on the loop and wait; on timeout it is cancelled, not left running."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"no result within {timeout} s") from None

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            if threading.current_thread() is not self._thread:
                self._thread.join(timeout)


# Sessions still open when the interpreter exits are closed then (TerminateSession included):
# their threads are daemons and would otherwise die with the session left open at AWS.
_open_sessions: "weakref.WeakSet[_BaseSession]" = weakref.WeakSet()


@atexit.register
def _close_open_sessions() -> None:
    for session in list(_open_sessions):
        session.close(timeout=5.0)


class _BaseSession:
    """Shared lifecycle: the loop thread, the channel, closing and the closed event."""

    kind = "session"

    def __init__(self, api: SsmApi, grant: Grant, target: str, options: ChannelOptions | None) -> None:
        self.session_id = grant.session_id
        self.target = target
        self.closed = threading.Event()
        self.ended = UpstreamEnd()            # told when ``closed`` is set (``on_closed``)
        self.last_error: DbtunneldError | None = None
        self._api = api
        self._grant = grant
        self._options = options or ChannelOptions()
        self._loop = _LoopThread(f"ssm-{grant.session_id}")
        self._channel: DataChannel | None = None
        self._close_lock = threading.Lock()
        self._closing = False
        _open_sessions.add(self)

    # Called once by the start functions, on the caller's thread.
    def _open(self, timeout: float) -> None:
        try:
            self._loop.call(self._start(), timeout)
        except BaseException as exc:
            error = exc if isinstance(exc, DbtunneldError) else TransientError(f"SSM session {self.session_id}: {type(exc).__name__}: {exc}")
            self.last_error = error
            self.close()
            raise error from None

    async def _start(self) -> None:
        self._channel = DataChannel(self._grant, self._api, options=self._options, target=self.target)
        self._grant = Grant(self.session_id, self._grant.stream_url, "")  # the channel keeps the token now
        handshake = await self._channel.start()
        await self._attach(handshake)
        asyncio.ensure_future(self._watch())

    async def _attach(self, handshake: Handshake) -> None:
        raise NotImplementedError

    async def _detach(self) -> None:
        """Stop relaying (local sockets see EOF)."""

    async def _watch(self) -> None:
        channel = self._channel
        assert channel is not None
        await channel.closed.wait()
        await self._detach()
        self.last_error = self.last_error or channel.error
        self.closed.set()
        self.ended.end()

    # --- public ----------------------------------------------------------------------------

    @property
    def stats(self) -> dict[str, int]:
        return self._channel.counters() if self._channel else {}

    def is_alive(self) -> bool:
        return not self.closed.is_set() and not self._closing

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self.closed.wait(timeout)

    def on_closed(self, callback: Callable[[], None]) -> None:
        """``callback()`` once when the session ends (its data channel closed, or ``close``)."""
        self.ended.add(callback)

    def close(self, timeout: float = 15.0) -> None:
        """End the session (TerminateSession included) and stop its thread. Idempotent."""
        with self._close_lock:
            if self._closing:
                return
            self._closing = True
        try:
            if self._loop.loop.is_running():
                self._loop.call(self._shutdown(), timeout)
        except Exception as exc:
            log.warning("[ssm session=%s] close: %s: %s", self.session_id, type(exc).__name__, exc)
        finally:
            self.closed.set()
            self.ended.end()
            self._loop.stop()
            _open_sessions.discard(self)

    async def _shutdown(self) -> None:
        await self._detach()
        if self._channel is not None:
            await self._channel.close()
        else:  # never got as far as a channel: still never leave the session open
            await asyncio.get_running_loop().run_in_executor(None, self._api.terminate_session, self.session_id)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _submit(self, coro: Coroutine[Any, Any, T], timeout: float | None) -> T:
        if not self.is_alive():
            coro.close()
            raise ClosedError(f"SSM {self.kind} {self.session_id} is closed", hint="start a new session")
        return self._loop.call(coro, timeout)


class SsmSession(_BaseSession):
    """An SSH session's byte stream; ``sock`` is the caller's end (give it to paramiko)."""

    kind = "SSH session"

    def __init__(self, api: SsmApi, grant: Grant, target: str, options: ChannelOptions | None = None) -> None:
        super().__init__(api, grant, target, options)
        ours, self.sock = stream_socket_pair()
        self._ours = ours
        self._writer: asyncio.StreamWriter | None = None
        self._pump: asyncio.Task[None] | None = None

    async def _attach(self, handshake: Handshake) -> None:
        if handshake.multiplexed:
            raise NeedsUserError(f"SSM session {self.session_id}: the agent started a port-forward session, not an SSH stream", hint="use AWS-StartSSHSession")
        reader, self._writer = await asyncio.open_connection(sock=self._ours, limit=RELAY_READ)
        assert self._channel is not None
        self._channel.set_sink(self._deliver)
        self._pump = asyncio.ensure_future(self._pump_local(reader))

    async def _deliver(self, payload: bytes) -> None:
        writer = self._writer
        if writer is None or writer.is_closing():
            return
        writer.write(payload)
        if writer.transport.get_write_buffer_size() > DELIVERY_HIGH_WATER:
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                pass

    async def _pump_local(self, reader: asyncio.StreamReader) -> None:
        channel = self._channel
        assert channel is not None
        try:
            while True:
                data = await reader.read(RELAY_READ)
                if not data:
                    break
                await channel.send(data)
        except (ConnectionError, OSError, ClosedError):
            pass
        if channel.is_open:
            log.info("[ssm session=%s] local side closed the SSH stream; ending the session", self.session_id)
            await channel.close()

    async def _detach(self) -> None:
        if self._pump is not None and self._pump is not asyncio.current_task():
            self._pump.cancel()
        if self._writer is not None:
            self._writer.close()
        else:
            self._ours.close()

    def close(self, timeout: float = 15.0) -> None:
        super().close(timeout)
        self._ours.close()


class PortForwardSession(_BaseSession):
    """A port-forward session to ``host:port`` behind the target; one smux stream per connection."""

    kind = "port-forward session"

    def __init__(self, api: SsmApi, grant: Grant, target: str, options: ChannelOptions | None = None) -> None:
        super().__init__(api, grant, target, options)
        self._mux: MuxClient | None = None
        self.on_connect_error: Callable[[], None] | None = None  # the agent could not dial host:port

    async def _attach(self, handshake: Handshake) -> None:
        if not handshake.multiplexed:
            raise NeedsUserError(f"SSM session {self.session_id}: the agent did not start a port-forward session", hint="use AWS-StartPortForwardingSessionToRemoteHost")
        agent = version_tuple(handshake.agent_version)
        if agent <= version_tuple(MUX_MIN_AGENT):
            raise NeedsUserError(
                f"SSM session {self.session_id}: agent {handshake.agent_version} cannot multiplex port forwarding",
                hint=f"update the SSM agent on {self.target} (above {MUX_MIN_AGENT})",
            )
        keepalive = KEEPALIVE_INTERVAL if agent <= version_tuple(MUX_KEEPALIVE_UNTIL_AGENT) else None
        channel = self._channel
        assert channel is not None
        self._mux = MuxClient(channel.send, keepalive=keepalive, label=f"[ssm session={self.session_id}]")
        channel.set_sink(self._mux.feed)
        channel.on_connect_error = self._connect_error
        self._mux.start()

    def _connect_error(self) -> None:
        callback = self.on_connect_error
        if callback is not None:
            callback()

    async def _detach(self) -> None:
        if self._mux is not None:
            error = self.last_error or (self._channel.error if self._channel is not None else None)
            await self._mux.close(error.message if error is not None and not self._closing else "")

    def open_stream(self, timeout: float = 10.0) -> socket.socket:
        """A connected socket to the remote host:port (blocking mode; close it when done)."""
        mux = self._mux
        if mux is None:
            raise ClosedError(f"SSM {self.kind} {self.session_id} is not open")
        return self._submit(mux.open_stream(), timeout)

    @property
    def stream_count(self) -> int:
        return self._mux.stream_count if self._mux else 0


SessionFactory = Callable[[SsmApi, Grant, str, ChannelOptions | None], _BaseSession]


def open_session(cls: SessionFactory, api: SsmApi, grant: Grant, target: str, options: ChannelOptions | None, timeout: float) -> Any:
    options = options or ChannelOptions()
    if options.ca_bundle is None and api.ca_bundle:
        options = dataclasses.replace(options, ca_bundle=api.ca_bundle)
    session = cls(api, grant, target, options)
    session._open(timeout)
    return session
