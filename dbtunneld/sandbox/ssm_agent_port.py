"""The agent's port plugin for the SSM stand-in: resolve once, dial, relay (plain or smux).

From aws/amazon-ssm-agent ``agent/session/plugins/port``:

* ``port.go`` ``PortPlugin.validateParameters``: the remote host is looked up *once* when the
  session starts (``lookupHost``); every later connection dials those addresses in order
  (``DialCall``: the first that connects wins, else the first error; no addresses -> "missing
  address"). A DNS change (an Aurora failover) is seen only by a new session. The lookup goes
  through ``resolve(host) -> list[str]`` (``PortPlugin.resolve``), the seam tests use to point a
  name elsewhere mid-run.
* ``port_basic.go`` ``BasicPortSession.WritePump`` and ``port_mux.go``
  ``MuxPortSession.transferDataToMgs``: read at most ``StreamDataPayloadSize`` (1024) bytes, send
  one message, sleep 1 ms, repeat: ~1 MB/s at best (``realistic`` pacing). ``fast`` pacing
  reads 256 KiB and sends ``agent_payload``-sized messages with no sleep, for tests of the
  client's own throughput.
* ``port_mux.go`` ``handleServerConnections``: streams are accepted and dialled one at a time;
  a failed dial sends the ``ConnectToPortError`` flag and closes the stream. smux keepalive is
  on only for clients at or below 1.2.331.0 (``muxKeepAliveDisabledAfterThisClientVersion``);
  then the smux server (xtaci/smux ``session.go`` ``keepalive``) sends NOP every 10 s and
  closes the session when nothing arrived for 30 s.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from . import ssm_wire as w

log = logging.getLogger(__name__)

FAST_READ = 256 * 1024
WRITE_HIGH_WATER = 4 << 20
OUTBOX_HIGH_WATER = 256 * 1024
SMUX_KEEPALIVE_INTERVAL = 10.0
SMUX_KEEPALIVE_TIMEOUT = 30.0

Resolver = Callable[[str], list[str]]
Send = Callable[[int, bytes], Awaitable[None]]  # (payload type, data): one agent message per call


def system_resolve(host: str) -> list[str]:
    """``net.LookupHost``: every address of ``host`` (an IP literal resolves to itself)."""
    infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(info[4][0] for info in infos))


@dataclass(frozen=True)
class Pacing:
    """How the port plugin turns upstream bytes into agent messages."""

    read_size: int = 1024  # mgsConfig.StreamDataPayloadSize
    pause: float = 0.001  # time.Sleep(time.Millisecond) after each message


REALISTIC = Pacing()


def fast_pacing(payload: int) -> Pacing:
    return Pacing(read_size=payload, pause=0.0)


@dataclass
class PortPlugin:
    """What the session's document asks the agent to run, and how it resolves the host."""

    properties: dict[str, str]
    host: str
    port: int
    resolve: Resolver = field(default=system_resolve, repr=False)

    @property
    def multiplexed(self) -> bool:
        return self.properties.get("type") == "LocalPortForwarding"


class Destination:
    """The addresses resolved at session start; ``dial`` tries them in order (``DialCall``)."""

    def __init__(self, plugin: PortPlugin) -> None:
        self.host, self.port = plugin.host, plugin.port
        try:
            self.addresses = plugin.resolve(plugin.host)
        except OSError as exc:
            log.warning("stand-in agent: lookup of %s failed: %s (dials will fail)", plugin.host, exc)
            self.addresses = []
        log.info("stand-in agent: %s resolved once for this session: %s", plugin.host, ", ".join(self.addresses) or "nothing")

    async def dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        first: OSError | None = None
        for address in self.addresses:
            try:
                reader, writer = await asyncio.open_connection(address, self.port, limit=FAST_READ)
            except OSError as exc:
                first = first or exc
                continue
            sock = writer.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return reader, writer
        raise first or OSError("missing address")


async def _write(writer: asyncio.StreamWriter, data: bytes) -> None:
    if writer.is_closing():
        return
    writer.write(data)
    if writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
        try:
            await writer.drain()
        except (ConnectionError, OSError):
            pass


class StreamRelay:
    """``BasicPortSession``: one TCP connection relayed as the session's byte stream."""

    def __init__(self, destination: Destination, send: Send, pacing: Pacing) -> None:
        self._destination = destination
        self._send = send
        self._pacing = pacing
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def start(self) -> None:
        self._reader, self._writer = await self._destination.dial()

    async def run(self) -> str:
        assert self._reader is not None
        try:
            while True:
                data = await self._reader.read(self._pacing.read_size if self._pacing.pause else FAST_READ)
                if not data:
                    break
                for offset in range(0, len(data), self._pacing.read_size):
                    await self._send(w.OUTPUT, data[offset : offset + self._pacing.read_size])
                if self._pacing.pause:
                    await asyncio.sleep(self._pacing.pause)
        except (ConnectionError, OSError):
            pass
        return f"the connection to {self._destination.host}:{self._destination.port} closed"

    async def write(self, data: bytes) -> None:
        if self._writer is not None:
            await _write(self._writer, data)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()


class MuxRelay:
    """``MuxPortSession``: an smux v1 server on the session's byte stream, one dial per stream."""

    def __init__(self, destination: Destination, send: Send, pacing: Pacing, keepalive: bool) -> None:
        self._destination = destination
        self._send = send
        self._pacing = pacing
        self._keepalive = keepalive
        self._reader = w.SmuxReader()
        self._upstreams: dict[int, _Upstream] = {}
        self._dial_lock = asyncio.Lock()  # handleServerConnections dials inside its accept loop
        self._outbox = bytearray()
        self._outbox_ready = asyncio.Event()
        self._outbox_room = asyncio.Event()
        self._outbox_room.set()
        self._done = asyncio.Event()
        self._reason = ""
        self._last_frame = time.monotonic()
        self._tasks: list[asyncio.Task] = []

    async def start(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._pump()))
        if self._keepalive:
            self._tasks.append(asyncio.ensure_future(self._keepalive_loop()))

    async def run(self) -> str:
        await self._done.wait()
        return self._reason

    async def write(self, data: bytes) -> None:
        try:
            frames = self._reader.feed(data)
        except w.WireError as exc:
            self._stop(str(exc))
            return
        self._last_frame = time.monotonic()
        for cmd, sid, payload in frames:
            await self._on_frame(cmd, sid, payload)

    async def _on_frame(self, cmd: int, sid: int, payload: bytes) -> None:
        upstream = self._upstreams.get(sid)
        if cmd == w.SYN and upstream is None:
            self._upstreams[sid] = _Upstream(self, sid)
        elif cmd == w.PSH and upstream is not None:
            await upstream.write(payload)
        elif cmd == w.FIN and upstream is not None:
            upstream.close()
            self._upstreams.pop(sid, None)

    async def enqueue(self, frame: bytes) -> None:
        while len(self._outbox) > OUTBOX_HIGH_WATER and not self._done.is_set():
            self._outbox_room.clear()
            await self._outbox_room.wait()
        self._outbox += frame
        self._outbox_ready.set()

    async def dial(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        async with self._dial_lock:
            return await self._destination.dial()

    async def connect_failed(self, sid: int, exc: OSError) -> None:
        log.warning("stand-in agent: stream %d: unable to dial %s:%d: %s", sid, self._destination.host, self._destination.port, exc)
        await self._send(w.FLAG, w.flag_payload(w.FLAG_CONNECT_TO_PORT_ERROR))
        await self.enqueue(w.smux_frame(w.FIN, sid))

    def forget(self, upstream: "_Upstream") -> None:
        if self._upstreams.get(upstream.sid) is upstream:
            del self._upstreams[upstream.sid]

    async def _pump(self) -> None:
        """transferDataToMgs: take up to read_size bytes of the smux stream per message."""
        size = self._pacing.read_size
        while True:
            await self._outbox_ready.wait()
            while self._outbox:
                chunk = bytes(self._outbox[:size])
                del self._outbox[:size]
                if len(self._outbox) <= OUTBOX_HIGH_WATER:
                    self._outbox_room.set()
                await self._send(w.OUTPUT, chunk)
                if self._pacing.pause:
                    await asyncio.sleep(self._pacing.pause)
            self._outbox_ready.clear()

    async def _keepalive_loop(self) -> None:
        while not self._done.is_set():
            await asyncio.sleep(SMUX_KEEPALIVE_INTERVAL)
            await self.enqueue(w.smux_frame(w.NOP, 0))
            if time.monotonic() - self._last_frame > SMUX_KEEPALIVE_TIMEOUT:
                self._stop("smux keepalive timeout (client version at or below 1.2.331.0)")

    def _stop(self, reason: str) -> None:
        self._reason = self._reason or reason
        self._done.set()
        self._outbox_room.set()

    async def close(self) -> None:
        for upstream in list(self._upstreams.values()):
            upstream.close()
        self._upstreams.clear()
        for task in self._tasks:
            task.cancel()
        self._stop("closed")


class _Upstream:
    """One smux stream's connection to the destination."""

    def __init__(self, mux: MuxRelay, sid: int) -> None:
        self._mux = mux
        self.sid = sid
        self._early: list[bytes] = []
        self._writer: asyncio.StreamWriter | None = None
        self._closed = False
        self._task = asyncio.ensure_future(self._run())

    async def _run(self) -> None:
        try:
            reader, self._writer = await self._mux.dial()
        except OSError as exc:
            self._mux.forget(self)
            await self._mux.connect_failed(self.sid, exc)
            return
        if self._closed:
            self._writer.close()
            return
        for data in self._early:
            self._writer.write(data)
        self._early.clear()
        await self._relay_upstream(reader)

    async def _relay_upstream(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                data = await reader.read(w.SMUX_MAX_FRAME)
                if not data:
                    break
                await self._mux.enqueue(w.smux_frame(w.PSH, self.sid, data))
        except (ConnectionError, OSError):
            pass
        if not self._closed:
            await self._mux.enqueue(w.smux_frame(w.FIN, self.sid))
        self.close()
        self._mux.forget(self)

    async def write(self, data: bytes) -> None:
        if self._writer is None:
            self._early.append(data)
        else:
            await _write(self._writer, data)

    def close(self) -> None:
        self._closed = True
        if self._writer is not None:
            self._writer.close()
        elif not self._task.done():
            self._task.cancel()
