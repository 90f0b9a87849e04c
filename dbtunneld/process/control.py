"""The daemon's control server: a Unix socket that serves the JSON-lines protocol.

It owns the socket (mode 0600 in a 0700 runtime directory, ``control_socket``) and checks every
peer's uid (SO_PEERCRED on Linux, getpeereid on macOS/BSD). Everything runs on the engine's one asyncio loop
(``engine_loop.EngineLoop``): one task per client, plus an event writer task per subscriber; no
thread per client. Bad input (not JSON, too long, unknown command) gets an error reply; a client
that keeps sending garbage, or reads its event stream too slowly, is dropped. The daemon never
stops because of a client.

Commands are served by a ``dispatch(Request) -> result`` callable given by the daemon. An
``async def`` dispatch is awaited on the loop. A plain one runs off the loop: ``status`` (a
read-only snapshot, ``QUICK_COMMANDS``) on the server's own snapshot thread, so it answers at once
even while other commands hang or the engine's worker pool is full; every other command on the
engine's pool (``EngineLoop.run_blocking``), at most ``COMMAND_SLOTS`` at a time so the keepers keep
workers. ``subscribe`` is served here: the reply carries a status snapshot and the connection then
receives every event published on the ``EventBus``.

Nobody can lock the owner out: a client must send a complete request within ``IDLE_TIMEOUT`` of
connecting (or of its last answer), or it is dropped; when ``MAX_IDLE`` clients wait without a
request, the one idle longest is dropped to make room, so a new client that asks at once (the CLI,
the tray) is always served. Subscribers (the tray's event stream) are counted apart
(``MAX_SUBSCRIBERS``) and never dropped for idleness.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import itertools
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any, Callable

from . import protocol as P
from .control_socket import (LISTEN_BACKLOG, SUN_PATH_MAX as SUN_PATH_MAX, PeerCred as PeerCred,
                             bind_control_socket as bind_control_socket, peer_credentials as peer_credentials,
                             prepare_runtime_dir as prepare_runtime_dir)
from ..core.errors import DbtunneldError, TransientError
from ..engine.engine_loop import EngineLoop, LoopClosedError
from .event_bus import EVENT_QUEUE as EVENT_QUEUE, EventBus as EventBus

log = logging.getLogger(__name__)

MAX_IDLE = 64                 # clients without a request; past it the longest idle is dropped
MAX_SUBSCRIBERS = 32          # event streams (trays) at once
IDLE_TIMEOUT = 10.0           # a client must send a complete request within this
MAX_BAD_LINES = 16            # consecutive bad lines before a client is dropped
SEND_TIMEOUT = 5.0            # a reply or event not taken by the client within this drops it
COMMAND_TIMEOUT = 120.0       # a command's own bound, plus its ``wait`` argument
FLUSH_TIMEOUT = 0.5           # at close, past the answer grace: a client that does not take what is left is cut off
QUICK_TIMEOUT = 10.0          # bound of a read-only snapshot (``status``)
COMMAND_SLOTS = 4             # blocking commands at once on the engine's pool (it has 8 workers)
QUICK_COMMANDS = frozenset({"status"})

Dispatch = Callable[[P.Request], Any]


# ----------------------------------------------------------------------------- one client

class _Connection:
    """One client, served by one task on the loop (plus an event writer task once subscribed)."""

    def __init__(self, server: "ControlServer", reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 number: int) -> None:
        self.server, self.reader, self.writer = server, reader, writer
        self.ctx = f"[client={number}]"
        task = asyncio.current_task()
        assert task is not None
        self.task: asyncio.Task[Any] = task
        self._events: asyncio.Queue[bytes | None] | None = None
        self._event_writer: asyncio.Task[None] | None = None
        self._bad = 0
        self.idle_since = time.monotonic()
        self.busy = False                  # a request is being served
        self.closed = False
        self.answered = asyncio.Event()    # clear while a request is being answered
        self.answered.set()

    async def serve(self) -> None:
        try:
            if await self.server._admit(self):
                await self._read_loop()
        except OSError as exc:
            log.debug("%s connection error: %s", self.ctx, exc)
        finally:
            self.close()
            self.server._forget(self)

    async def _read_loop(self) -> None:
        buf = P.LineBuffer(P.MAX_REQUEST_BYTES)
        while not self.server.closing:
            data = await self._read_some()
            if data is None:
                log.info("%s dropped: no complete request within %g s", self.ctx, IDLE_TIMEOUT)
                return
            if not data:
                if buf.pending:
                    log.info("%s closed in the middle of a line (%d bytes dropped)", self.ctx, buf.pending)
                return
            for line in buf.feed(data):
                if not await self._serve_line(line):
                    return

    async def _read_some(self) -> bytes | None:
        """The next bytes (b"" at the end); None when an idle client ran out of time."""
        if not self.idle:
            return await self.reader.read(65536)
        left = IDLE_TIMEOUT - (time.monotonic() - self.idle_since)
        try:
            return await asyncio.wait_for(self.reader.read(65536), max(0.0, left))
        except asyncio.TimeoutError:
            return None

    async def _serve_line(self, line: bytes | P.Oversized) -> bool:
        if isinstance(line, P.Oversized):
            return await self._reject(P.BadRequest("too_large", f"request of {line.size} bytes exceeds "
                                                   f"the limit of {P.MAX_REQUEST_BYTES}"))
        try:
            request = P.parse_request(line)
        except P.BadRequest as exc:
            return await self._reject(exc)
        self._bad = 0
        if request.cmd == "subscribe":
            return await self._subscribe(request)
        self.busy = True
        try:
            await self._answer(request)
        finally:
            self.busy, self.idle_since = False, time.monotonic()
        return True

    @property
    def idle(self) -> bool:
        """Waiting for a request: may be dropped when it takes too long or room is needed."""
        return self._events is None and not self.busy and not self.closed

    async def _reject(self, exc: P.BadRequest) -> bool:
        self._bad += 1
        log.info("%s bad request (%s): %s", self.ctx, exc.kind, exc.message)
        await self.send(P.encode_error(exc.id, exc.kind, exc.message, exc.hint))
        if self._bad >= MAX_BAD_LINES:
            log.warning("%s dropped after %d bad requests in a row", self.ctx, self._bad)
            return False
        return True

    async def _answer(self, request: P.Request) -> None:
        log.debug("%s %s %s", self.ctx, request.cmd, sorted(request.args))
        self.answered.clear()
        try:
            try:
                line = P.encode_result(request.id, await self.server.run_command(request))
            except Exception as exc:  # every failure becomes a reply; the daemon keeps running
                self._log_failure(request, exc)
                line = P.encode_error(request.id, **P.error_payload(exc))
            await self.send(line)
        finally:
            self.answered.set()

    def _log_failure(self, request: P.Request, exc: Exception) -> None:
        if isinstance(exc, DbtunneldError):
            log.info("%s %s failed: %s", self.ctx, request.cmd, exc.message)
        else:
            log.exception("%s %s failed with an internal error", self.ctx, request.cmd)

    async def _subscribe(self, request: P.Request) -> bool:
        bus = self.server.bus
        if self._events is not None:
            await self.send(P.encode_error(request.id, "bad_args", "already subscribed"))
            return True
        if bus.subscribers >= MAX_SUBSCRIBERS:
            await self.send(P.encode_error(request.id, "busy", f"too many event subscribers ({MAX_SUBSCRIBERS})",
                                           "close other dbtunneld trays; requests are still served"))
            return True
        self._events = bus.subscribe(EVENT_QUEUE, on_evict=self._on_evicted)
        await self._answer(P.Request(request.id, "status", {}))     # events published meanwhile wait
        self._event_writer = asyncio.create_task(self._write_events(self._events), name=f"{self.ctx} events")
        log.info("%s subscribed to events", self.ctx)
        return True

    async def _write_events(self, events: "asyncio.Queue[bytes | None]") -> None:
        """Until ``None``: from the bus when it evicts (the connection is aborted already) or from
        ``end_events`` at close (what was written still goes out)."""
        while True:
            line = await events.get()
            if line is None or not await self.send(line):
                break
        self.closed = True
        self.writer.close()

    def end_events(self) -> "asyncio.Task[None] | None":
        """At close: the event writer sends what is queued, then ends; its task (None if not subscribed)."""
        if self._events is not None:
            try:
                self._events.put_nowait(None)
            except asyncio.QueueFull:
                pass                    # the bus evicts it at the next event; the grace bounds the wait
        return self._event_writer

    def _on_evicted(self) -> None:
        log.warning("%s dropped: it reads its event stream too slowly (%d events queued)", self.ctx, EVENT_QUEUE)
        self.evict()

    async def send(self, line: bytes) -> bool:
        """Write ``line``; False (and the client dropped) when it cannot go out within SEND_TIMEOUT."""
        if self.writer.is_closing():
            return False
        self.writer.write(line)
        try:
            await asyncio.wait_for(self.writer.drain(), SEND_TIMEOUT)
            return True
        except (OSError, asyncio.TimeoutError) as exc:
            log.info("%s send failed (%s); dropping the client", self.ctx, exc or type(exc).__name__)
            self.evict()
            return False

    def evict(self) -> None:
        """End this client now (what it did not read is dropped); its task then ends."""
        self.closed = True
        self.writer.transport.abort()

    def close(self) -> None:
        """Unsubscribe, flush what is written and close (idempotent)."""
        self.closed = True
        events, self._events = self._events, None
        if events is not None:
            self.server.bus.unsubscribe(events)
        if self._event_writer is not None:
            self._event_writer.cancel()
        self.writer.close()

    async def refuse(self, kind: str, message: str, hint: str) -> None:
        """Reply why, half-close, then read what the peer already sent (bounded), so closing
        sends no reset that would destroy our reply before the peer reads it."""
        await self.send(P.encode_error(None, kind, message, hint))
        try:
            self.writer.write_eof()
            await asyncio.wait_for(self._discard_input(1 << 20), 1.0)
        except (OSError, asyncio.TimeoutError):
            pass

    async def _discard_input(self, limit: int) -> None:
        while limit > 0:
            data = await self.reader.read(65536)
            if not data:
                return
            limit -= len(data)


# ----------------------------------------------------------------------------- the server

class ControlServer:
    """Serves clients on the control socket from an engine loop; ``start()`` returns once it listens.

    Without ``engine`` it creates its own loop (started in ``start``, stopped in ``close``)."""

    def __init__(self, path: Path, dispatch: Dispatch, bus: EventBus | None = None,
                 allowed_uid: int | None = None, engine: EngineLoop | None = None) -> None:
        self.path = Path(path)
        self.dispatch = dispatch
        self.engine = engine or EngineLoop(name="control-engine")
        self._owns_engine = engine is None
        self.bus = bus or EventBus()
        self.bus.attach(self.engine)
        self.allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self.closing = False
        self._async_dispatch = _is_coroutine_function(dispatch)
        self._server: asyncio.AbstractServer | None = None
        self._clients: set[_Connection] = set()
        self._numbers = itertools.count(1)
        self._command_slots = asyncio.Semaphore(COMMAND_SLOTS)
        self._snapshots = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="control-snapshot")

    def start(self) -> "ControlServer":
        listener = bind_control_socket(self.path)
        try:
            self.engine.start()
            self.engine.run(self._listen(listener), timeout=10.0)
        except BaseException:
            listener.close()
            self._remove_socket_file()
            self._stop_owned_engine()
            raise
        log.info("control socket listening at %s", self.path)
        return self

    async def _listen(self, listener: socket.socket) -> None:
        self._server = await asyncio.start_unix_server(self._on_client, sock=listener, backlog=LISTEN_BACKLOG)

    def __enter__(self) -> "ControlServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def clients(self) -> int:
        return len(self._clients)

    async def _on_client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.closing:
            writer.transport.abort()
            return
        conn = _Connection(self, reader, writer, next(self._numbers))
        self._make_room()
        self._clients.add(conn)
        try:
            await conn.serve()
        except asyncio.CancelledError:
            pass        # closing or the loop stopping: asyncio would log a cancelled client task as an error

    def _make_room(self) -> None:
        """Keep fewer than MAX_IDLE clients waiting without a request: drop the longest idle."""
        idle = [c for c in self._clients if c.idle]
        if len(idle) < MAX_IDLE:
            return
        victim = min(idle, key=lambda c: c.idle_since)
        log.info("%s dropped to make room (%d clients idle; idle %.1f s)", victim.ctx, len(idle),
                 time.monotonic() - victim.idle_since)
        victim.evict()

    async def _admit(self, conn: _Connection) -> bool:
        """True if the peer may talk to us, else reply why and drain it."""
        try:
            peer = peer_credentials(conn.writer.get_extra_info("socket"))
        except OSError:
            peer = None
        reason = self._refusal(peer)
        if reason is None:
            assert peer is not None
            conn.ctx = f"{conn.ctx[:-1]} pid={peer.pid}]"
            return True
        log.warning("%s refused: %s", conn.ctx, reason[1])
        await conn.refuse(*reason)
        return False

    def _refusal(self, peer: PeerCred | None) -> tuple[str, str, str] | None:
        if peer is None:
            return ("permission_denied", "cannot tell who is connecting", "")
        if peer.uid != self.allowed_uid:
            return ("permission_denied", f"uid {peer.uid} (pid {peer.pid}) may not use this daemon",
                    f"the daemon belongs to uid {self.allowed_uid}; run your own with `dbtunneld daemon`")
        return None

    def _forget(self, conn: _Connection) -> None:
        self._clients.discard(conn)

    # ---- running commands

    async def run_command(self, request: P.Request) -> Any:
        """The dispatch's result, without ever blocking the loop; TransientError past its bound."""
        bound = self._bound(request)
        try:
            return await asyncio.wait_for(self._dispatch(request), bound)
        except asyncio.TimeoutError:
            raise TransientError(f"`{request.cmd}` did not finish within {bound:g} s; it goes on in the background",
                                 "see `dbtunneld status` and the daemon log") from None

    def _bound(self, request: P.Request) -> float:
        if request.cmd in QUICK_COMMANDS and not self._async_dispatch:
            return QUICK_TIMEOUT
        return COMMAND_TIMEOUT + float(request.args.get("wait", 0.0))

    async def _dispatch(self, request: P.Request) -> Any:
        if self._async_dispatch:
            return await self.dispatch(request)
        if request.cmd in QUICK_COMMANDS:   # the snapshot thread: never queued behind hung commands
            return await asyncio.get_running_loop().run_in_executor(self._snapshots, self.dispatch, request)
        async with self._command_slots:
            return await self.engine.run_blocking(self.dispatch, request)

    # ---- closing

    def close(self, timeout: float = 3.0, answer_grace: float = 2.0) -> None:
        """Stop accepting, let replies being answered and events already published go out (up to
        ``answer_grace`` s, e.g. the ``stop`` reply with the revocation report and the ``stopping``
        event), drop every client, remove the socket file (idempotent)."""
        if self.closing:
            return
        self.closing = True
        if self._server is not None:
            try:
                self.engine.run(self._close_clients(timeout, answer_grace), timeout=timeout + answer_grace + 2.0)
            except (LoopClosedError, concurrent.futures.TimeoutError) as exc:
                log.warning("control server: clients not closed cleanly (%s)", type(exc).__name__)
            self._remove_socket_file()
        self._snapshots.shutdown(wait=False, cancel_futures=True)
        self._stop_owned_engine()
        log.info("control socket closed")

    async def _close_clients(self, timeout: float, answer_grace: float) -> None:
        deadline = time.monotonic() + answer_grace
        if self._server is not None:
            self._server.close()                         # closes the listening socket
        await asyncio.sleep(0)                           # clients accepted just now see ``closing``
        clients = list(self._clients)
        answering: list[asyncio.Task[Any]] = [asyncio.create_task(c.answered.wait())
                                               for c in clients if not c.answered.is_set()]
        flushing: list[asyncio.Task[Any]] = [t for t in (c.end_events() for c in clients) if t is not None]
        if answering or flushing:
            await asyncio.wait(answering + flushing, timeout=answer_grace)
            for waiter in answering:
                waiter.cancel()
        for c in clients:
            c.close()                                    # what is written goes out, then EOF
            if c.busy:                                   # past the grace: its answer is dropped
                c.evict()
                c.task.cancel()
        await self._end_tasks(clients, max(FLUSH_TIMEOUT, deadline - time.monotonic()), timeout)

    async def _end_tasks(self, clients: list[_Connection], flush: float, timeout: float) -> None:
        """Wait for the clients' tasks; a peer that does not take what is left within ``flush``
        seconds is cut off."""
        tasks = {c.task for c in clients}
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=flush)
        for c in clients:
            if c.task in late:
                c.evict()
        if late:
            await asyncio.wait(late, timeout=timeout)

    def _stop_owned_engine(self) -> None:
        if self._owns_engine:
            self.engine.stop()

    def _remove_socket_file(self) -> None:
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _is_coroutine_function(fn: Callable[..., Any]) -> bool:
    """An ``async def`` function, method or callable object (awaited on the loop, not in a thread)."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(getattr(fn, "__call__", None))
