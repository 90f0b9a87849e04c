"""The client side of a tunnel: accepting on its port, a channel per client, the hand-off to the
forwarding loop, and refusals that say why (a MySQL ERR packet).

No thread of its own: the listening socket is watched by the engine loop (``loop.add_reader``);
each accepted client is a task on that loop that waits (without holding a thread) until the
tunnel's upstream is up, opens its channel with ``EngineLoop.run_blocking`` (the engine's bounded
worker pool), runs the ``before_relay`` step there too, and hands both ends to the tunnel's
``forward.Forwarder``. The tunnel (``UpstreamGate``) says when a client may go ahead.

Also here: which CPU a tunnel's data path runs on (``data_path_cpu``, ``on_cpu``).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import threading
import time
from typing import Any, Callable, Protocol, TypeVar

from ..adapters import forward
from ..adapters.forward_link import Link
from ..adapters.forward_upstream import upstream_for
from ..adapters.command_watch import CommandWatch, Handoff
from ..adapters.log import RepeatLimiter
from ..adapters.mysqlwire import mysql_error_packet
from ..adapters.transport import Transport
from ..core.config import TunnelSettings
from ..core.errors import DbtunneldError, NeedsUserError
from .engine_loop import EngineLoop, LoopClosedError
from .tunnel_health import close_quietly

log = logging.getLogger(__name__)

T = TypeVar("T")
BeforeRelay = Callable[[socket.socket, Any], "socket.socket | Handoff | None"]
FAILURE_LOG_INTERVAL = 60.0       # a refusal that repeats is logged at most this often
RECHECK_WHILE_WAITING = 1.0       # a waiting client looks at the tunnel at least this often
ACCEPT_PAUSE = 0.1                # after a failed accept (EMFILE): don't spin


class UpstreamGate(Protocol):
    """What the client side asks its tunnel."""

    name: str
    remote: tuple[str, int]
    settings: TunnelSettings
    transport: Transport

    def failures_so_far(self) -> int:
        """Connects that failed into backoff so far."""
        ...

    def client_verdict(self, failed_on: int, checks: int, failures_seen: int) -> tuple[int, int] | str | None:
        """Go ahead on (upstream id, checks), a refusal's text, or None: keep waiting."""
        ...

    def describe_trouble(self) -> str: ...

    def current_generation(self) -> int:
        """The id of the current upstream (bumped when one is dropped)."""
        ...

    def kick(self, reason: str) -> None:
        """Wake the tunnel's keeper with ``reason``."""
        ...


class ClientSide:
    """Clients of one tunnel; ``open`` at start, ``close`` at stop (both from any thread but the
    engine loop's, or on it)."""

    def __init__(self, gate: UpstreamGate, log_to: Any, *, cpu: int | None = None,
                 refuse_as_mysql: bool = True, before_relay: BeforeRelay | None = None,
                 on_client: Callable[[], None] = lambda: None) -> None:
        self._gate = gate
        self._on_client = on_client
        self._log = log_to
        self._cpu = cpu
        self._refuse_as_mysql = refuse_as_mysql
        self._before_relay = before_relay
        self._lock = threading.Lock()
        self._pipes: set[Link] = set()
        self._bytes_down = 0              # received by pipes that have ended
        self._open = self._total = self._waiting = 0
        self._serial = itertools.count(1)
        self._refusal_log = RepeatLimiter(FAILURE_LOG_INTERVAL)
        self._engine: EngineLoop | None = None
        self._listener: socket.socket | None = None
        self._forwarder: forward.Forwarder | None = None
        self._news: asyncio.Event | None = None     # set (and replaced) when the tunnel changes

    # ---- from the tunnel -------------------------------------------------------------------------

    def open(self, listener: socket.socket, forwarder: forward.Forwarder, engine: EngineLoop) -> None:
        """Start accepting on ``listener`` (bound and listening) on ``engine``'s loop."""
        listener.setblocking(False)
        with self._lock:
            self._listener, self._forwarder, self._engine = listener, forwarder, engine
        engine.call(self._watch_listener, listener)

    def close(self) -> None:
        """Stop accepting and close the listener; waiting clients are refused ("stopping")."""
        with self._lock:
            listener, self._listener = self._listener, None
            engine, self._forwarder = self._engine, None
        self.news()
        if listener is None:
            return
        if engine is not None:
            self._unwatch(engine, listener)
        listener.close()

    def news(self) -> None:
        """The tunnel changed (state, upstream, a check): waiting clients look again. Any thread."""
        engine = self._engine
        if engine is not None:
            engine.call(self._publish)

    def waiting(self) -> int:
        with self._lock:
            return self._waiting

    def counts(self) -> tuple[int, int]:
        """(open, total) connections."""
        with self._lock:
            return self._open, self._total

    def traffic(self) -> int:
        """Bytes received from the upstream so far (evidence of life while a keepalive is late)."""
        with self._lock:
            return self._bytes_down + sum(p.received for p in self._pipes)

    def abort(self, which: Callable[[Link], bool]) -> None:
        with self._lock:
            doomed = [p for p in self._pipes if which(p)]
        for pipe in doomed:
            pipe.abort()

    def reset_refusal_log(self) -> None:
        self._refusal_log.reset()

    # ---- accepting (on the engine loop) ----------------------------------------------------------

    def _watch_listener(self, listener: socket.socket) -> None:
        if listener is self._listener:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept_ready, listener)

    def _unwatch(self, engine: EngineLoop, listener: socket.socket) -> None:
        """Take the listener off the loop before its fd is closed (and maybe reused)."""
        async def unwatch() -> None:
            engine.loop.remove_reader(listener.fileno())
        if engine.on_loop():
            engine.loop.remove_reader(listener.fileno())
            return
        try:
            engine.run(unwatch(), timeout=5.0)
        except (LoopClosedError, RuntimeError, TimeoutError) as exc:
            self._log.debug("listener not taken off the engine loop: %s", exc)

    def _accept_ready(self, listener: socket.socket) -> None:
        while listener is self._listener:
            try:
                client, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:     # EMFILE and friends: pause instead of spinning
                self._log.warning("accept failed: %s", exc)
                loop = asyncio.get_running_loop()
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_PAUSE, self._watch_listener, listener)
                return
            self._client_arrived(client)

    def _client_arrived(self, client: socket.socket) -> None:
        client.setblocking(True)
        client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._lock:
            self._open += 1
            self._total += 1
        self._on_client()
        asyncio.get_running_loop().create_task(self._serve(client, next(self._serial)))

    # ---- one client (a task on the engine loop) --------------------------------------------------

    async def _serve(self, client: socket.socket, number: int) -> None:
        """Open the client's channel, then hand both to the forwarding loop."""
        forwarding = False
        deadline = time.monotonic() + self._gate.settings.connect_wait
        try:
            opened = await self._open_for_client(deadline, client if self._before_relay is None else None)
            if isinstance(opened, str):
                self._refuse(client, opened)
                return
            chan, generation, adopted = opened
            if adopted:
                forwarding = self._adopted(client, chan, generation)
                return
            relay = await self._ready_to_relay(client, chan)
            if relay is None:
                return
            handoff = relay if isinstance(relay, Handoff) else Handoff(relay)
            server = chan if handoff.server is None else handoff.server
            forwarding = self._forward(handoff.client, server, generation,
                                       f"[tunnel={self._gate.name}] conn-{number}", handoff.commands)
            client = handoff.client
        finally:
            if not forwarding:
                close_quietly(client)
                with self._lock:
                    self._open -= 1

    def _adopted(self, client: socket.socket, handle: Any, generation: int) -> bool:
        """The transport forwards ``client`` itself (``Transport.adopts_clients``: the OpenSSH
        master) through ``handle``; True (the handle ends it: ``_link_ended``)."""
        handle.generation = generation
        close_quietly(client)                       # the transport holds its own copy
        with self._lock:
            self._pipes.add(handle)
            stale = generation != self._gate.current_generation() or self._forwarder is None
        handle.on_end(self._link_ended)
        if stale:
            handle.abort()
        return True

    async def _open_for_client(self, deadline: float,
                               adopt: socket.socket | None = None) -> tuple[Any, int, bool] | str:
        """A channel for one client, waiting through rebuilds: (channel, upstream id, False); or,
        when the transport forwards clients itself (asked once it is up: with client "auto" the
        engine is chosen at each connect), its handle on ``adopt``: (handle, upstream id, True);
        or why there is none."""
        seen, checks = -1, -1
        while True:
            got = await self._await_up(deadline, seen, checks)
            if isinstance(got, str):
                return got
            generation, checks = got
            slow = asyncio.get_running_loop().call_later(self._gate.settings.health_timeout, self._open_is_slow)
            try:
                if adopt is not None and self._gate.transport.adopts_clients:
                    return await self._adopt_on_loop(deadline, adopt), generation, True
                return await self._blocking(self._open_channel, deadline), generation, False
            except (DbtunneldError, OSError) as exc:
                if isinstance(exc, NeedsUserError) or _remote_refused(exc):
                    self._gate.kick("check")
                    return exc.one_line() if isinstance(exc, DbtunneldError) else str(exc)
                self._log.info("channel open failed (%s); checking the upstream", exc)
                self._gate.kick("suspect")
                seen = generation
                if time.monotonic() >= deadline:     # it had all of connect_wait: say so, not "up"
                    host, port = self._gate.remote
                    return (f"dbtunneld: no connection to {host}:{port} through tunnel {self._gate.name!r} "
                            f"within connect_wait ({self._gate.settings.connect_wait:g} s): {exc}")
            finally:
                slow.cancel()

    def _open_is_slow(self) -> None:
        """A channel open unanswered after health_timeout: the upstream is checked (a dead one is
        rebuilt, which fails the open and the client waits for the new one), while the open itself
        goes on until connect_wait: on a busy single-stream link (ssm-ssh) the confirmation is
        queued behind the bytes in flight, and giving the open up only queues the next one
        behind more of them (the check counts arriving bytes as life)."""
        self._log.info("a channel open is unanswered after %g s; checking the upstream",
                       self._gate.settings.health_timeout)
        self._gate.kick("suspect")

    def _open_channel(self, deadline: float) -> Any:
        """On the worker pool: one channel (closed at once if the tunnel stopped meanwhile)."""
        chan = self._gate.transport.open_channel(*self._gate.remote, timeout=self._open_timeout(deadline))
        return self._unless_stopping(chan)

    async def _adopt_on_loop(self, deadline: float, client: socket.socket) -> Any:
        """On the engine loop (no worker thread): the transport's handle on the adopted client
        (closed at once if the tunnel stopped meanwhile)."""
        handle = await self._gate.transport.adopt(client, *self._gate.remote, self._open_timeout(deadline))
        return self._unless_stopping(handle)

    def _open_timeout(self, deadline: float) -> float:
        """The rest of connect_wait (see ``_open_is_slow`` for the check after health_timeout)."""
        return max(0.5, deadline - time.monotonic())

    def _unless_stopping(self, chan: Any) -> Any:
        if self._forwarder is None:
            close_quietly(chan)
            raise OSError("the tunnel is stopping")
        return chan

    async def _await_up(self, deadline: float, failed_on: int, checks: int) -> tuple[int, int] | str:
        """Wait until the tunnel is up on an upstream other than ``failed_on``, or that one passed
        a check after the failure; (upstream id, checks) or why not."""
        with self._lock:
            self._waiting += 1
        try:
            failures_seen = self._gate.failures_so_far()
            while True:
                news = self._news_event()
                verdict = self._gate.client_verdict(failed_on, checks, failures_seen)
                if verdict is not None:
                    return verdict
                left = deadline - time.monotonic()
                if left <= 0:
                    return self._gate.describe_trouble()
                try:
                    await asyncio.wait_for(news.wait(), min(left, RECHECK_WHILE_WAITING))
                except asyncio.TimeoutError:
                    pass
        finally:
            with self._lock:
                self._waiting -= 1

    def _news_event(self) -> asyncio.Event:
        if self._news is None:
            self._news = asyncio.Event()
        return self._news

    def _publish(self) -> None:
        news, self._news = self._news, None
        if news is not None:
            news.set()

    async def _ready_to_relay(self, client: socket.socket, chan: Any) -> socket.socket | Handoff | None:
        """The ``before_relay`` step (the one seam between accepting and relaying)."""
        if self._before_relay is None:
            return client
        try:
            relay = await self._blocking(self._before_relay, client, chan)
            if relay is not None:
                return relay
        except Exception:
            self._log.exception("before_relay failed")
        close_quietly(chan)
        return None

    def _forward(self, client: socket.socket, chan: Any, generation: int, label: str,
                 commands: CommandWatch | None = None) -> bool:
        """True when the forwarding loop took the connection (it ends it: ``_link_ended``)."""
        try:
            upstream = upstream_for(chan)
        except TypeError as exc:
            self._log.error("%s: %s", label, exc)
            close_quietly(chan)
            return False
        with self._lock:
            forwarder = self._forwarder
            if forwarder is None:                # stopping
                close_quietly(chan)
                return False
            link = forwarder.add(client, upstream, self._link_ended, label, generation, commands)
            if not link.ended:                  # (a loop that has stopped ends it at once)
                self._pipes.add(link)
        if generation != self._gate.current_generation():
            link.abort()                        # the upstream was dropped while we opened
        return True

    def _link_ended(self, link: Link) -> None:
        with self._lock:
            self._pipes.discard(link)
            self._bytes_down += link.received
            self._open -= 1

    def _refuse(self, client: socket.socket, why: str) -> None:
        held = self._refusal_log.admit(why)
        if held is not None:
            more = f" ({held} more refused with it since the last such line)" if held else ""
            self._log.info("client refused: %s%s", why, more)
        if self._refuse_as_mysql:
            try:                                 # a fresh socket takes a few hundred bytes at once
                client.setblocking(False)
                client.send(mysql_error_packet(why))
            except OSError:
                pass

    async def _blocking(self, fn: Callable[..., T], *args: Any) -> T:
        engine = self._engine
        if engine is None:
            raise OSError("the tunnel is stopping")
        return await engine.run_blocking(on_cpu, self._cpu, fn, *args)


def _remote_refused(exc: BaseException) -> bool:
    """The bastion is fine but the database end refused (so waiting for a rebuild won't help)."""
    from ..adapters.ssh import ChannelOpenError
    return isinstance(exc, ChannelOpenError)


# ---- CPU affinity of a tunnel's data path ------------------------------------------------------

# Every thread of one tunnel's data path runs on one CPU (Linux: threads inherit the affinity of
# the thread that starts them, so pinning the forwarding loop and the pooled thread that connects
# covers the SSH reader and the pings; channel opens run pinned too). The data path hands the GIL
# back and forth between the SSH reader and the forwarding loop; across two CPUs every hand-off is
# a cross-CPU wake-up: with 4 busy connections sysbench oltp_read_only went from ~320 to ~470 tps
# (p95 17 -> 11 ms, forwarder CPU per query 134 -> 77 us) when pinned
# (bench/concurrency_probe.py --sysbench). Tunnels take CPUs in turn.
# DBTUNNELD_PIN_THREADS=0 turns it off.
_CPU_TURNS = itertools.count()


def data_path_cpu() -> int | None:
    """The CPU for the next tunnel's threads, or None where threads cannot (or must not) be pinned."""
    if not hasattr(os, "sched_setaffinity") or os.environ.get("DBTUNNELD_PIN_THREADS") == "0":
        return None
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except OSError:
        return None
    return cpus[next(_CPU_TURNS) % len(cpus)] if len(cpus) > 1 else None


def pin_this_thread(cpu: int | None) -> None:
    if cpu is None:
        return
    try:
        os.sched_setaffinity(0, {cpu})       # 0: the calling thread
    except OSError as exc:                   # e.g. the CPU went offline: run unpinned
        log.debug("cannot pin %s to CPU %d: %s", threading.current_thread().name, cpu, exc)


def on_cpu(cpu: int | None, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with the calling (pooled, shared) thread pinned to ``cpu``, then unpinned:
    threads it starts (paramiko's reader, a ping) keep the pin."""
    if cpu is None:
        return fn(*args)
    before = os.sched_getaffinity(0)
    pin_this_thread(cpu)
    try:
        return fn(*args)
    finally:
        try:
            os.sched_setaffinity(0, before)
        except OSError:
            pass
