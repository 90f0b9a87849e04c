"""smux v1 (github.com/xtaci/smux), the stream multiplexer SSM port-forward sessions speak.

The agent runs an smux *server* on the byte stream of the data channel when the session's
properties say ``"type": "LocalPortForwarding"`` and the client version allows it; every client
connection is one smux stream. Frame: version (1), command (1), length (2, little-endian),
stream id (4, little-endian), then ``length`` data bytes. Commands: SYN opens a stream, FIN closes
it (the sender will neither read nor write it again: a full close, as in smux), PSH carries data,
NOP keeps the session alive. Version 1 has no per-stream window (UPD is version 2 only).
Client stream ids are odd (3, 5, 7...).

``FrameParser`` and ``encode_frame`` are pure; ``MuxClient`` runs the client side on an asyncio
loop, with one socket pair per stream so that callers get a real socket.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from ...core.errors import ClosedError, ProtocolError

VERSION = 1
SYN, FIN, PSH, NOP, UPD = 0, 1, 2, 3, 4
HEADER = struct.Struct("<BBHI")
MAX_FRAME = 32768  # smux's default frame size: data per PSH
KEEPALIVE_INTERVAL = 10.0
OUTBOX_LIMIT = 1 << 20  # queued outgoing bytes before stream readers wait
DELIVERY_LIMIT = 1 << 20  # bytes queued towards one local socket before the mux waits for it
SOCKET_BUFFER = 1 << 20

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Frame:
    cmd: int
    sid: int
    data: bytes = b""


def encode_frame(cmd: int, sid: int, data: bytes = b"") -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"smux frame data of {len(data)} bytes (max 65535)")
    return HEADER.pack(VERSION, cmd, len(data), sid) + data


def encode_data(sid: int, data: bytes, max_frame: int = MAX_FRAME) -> bytes:
    """PSH frames carrying ``data`` for stream ``sid``, split at ``max_frame``."""
    if len(data) <= max_frame:
        return encode_frame(PSH, sid, data)
    view = memoryview(data)
    return b"".join(encode_frame(PSH, sid, bytes(view[i : i + max_frame])) for i in range(0, len(data), max_frame))


class FrameParser:
    """Incremental decoder: feed bytes as they come, get whole frames out."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes) -> list[Frame]:
        self._buf += data
        frames = []
        buf, pos, size = self._buf, self._pos, HEADER.size
        while len(buf) - pos >= size:
            version, cmd, length, sid = HEADER.unpack_from(buf, pos)
            if version != VERSION:
                raise ProtocolError(f"smux frame version {version} (expected {VERSION})")
            if cmd > UPD:
                raise ProtocolError(f"smux frame with unknown command {cmd}")
            if len(buf) - pos - size < length:
                break
            frames.append(Frame(cmd, sid, bytes(buf[pos + size : pos + size + length])))
            pos += size + length
        if pos > 65536 or pos == len(buf):
            del buf[:pos]
            pos = 0
        self._pos = pos
        return frames


def stream_socket_pair() -> tuple[socket.socket, socket.socket]:
    """(ours, theirs): a connected pair with roomy buffers; ours is non-blocking for the loop."""
    ours, theirs = socket.socketpair()
    for s in (ours, theirs):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SOCKET_BUFFER)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SOCKET_BUFFER)
    ours.setblocking(False)
    return ours, theirs


class _Stream:
    """One smux stream bridged to the local end of a socket pair."""

    def __init__(self, sid: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.sid = sid
        self.opened = time.monotonic()
        self.reader = reader
        self.writer = writer
        self.local_done = False  # we sent FIN
        self.remote_done = False  # peer sent FIN
        self.pump: asyncio.Task[None] | None = None

    def deliver(self, data: bytes) -> bool:
        """Queue data towards the local socket; False when the local side is gone."""
        if self.writer.is_closing():
            return False
        self.writer.write(data)
        return True

    def needs_drain(self) -> bool:
        transport = self.writer.transport
        return not transport.is_closing() and transport.get_write_buffer_size() > DELIVERY_LIMIT

    def close_local(self) -> None:
        if not self.writer.is_closing():
            self.writer.close()


class MuxClient:
    """The client side of smux over an ordered byte pipe (the data channel).

    ``send`` puts bytes on the pipe (in order); bytes from the pipe go to ``feed``.
    ``open_stream`` returns the caller's end of a socket pair, relayed to a new smux stream.
    """

    def __init__(self, send: Callable[[bytes], Awaitable[None]], *, keepalive: float | None = None, label: str = "") -> None:
        self._send = send
        self._keepalive = keepalive
        self._label = label
        self._parser = FrameParser()
        self._streams: dict[int, _Stream] = {}
        self._next_sid = 1
        self._outbox = bytearray()
        self._outbox_ready = asyncio.Event()
        self._outbox_room = asyncio.Event()
        self._outbox_room.set()
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._writer_loop()))
        if self._keepalive:
            self._tasks.append(asyncio.ensure_future(self._keepalive_loop(self._keepalive)))

    @property
    def stream_count(self) -> int:
        return len(self._streams)

    async def open_stream(self) -> socket.socket:
        if self._closed:
            raise ClosedError("the port-forward session is closed")
        self._next_sid += 2
        sid = self._next_sid
        ours, theirs = stream_socket_pair()
        reader, writer = await asyncio.open_connection(sock=ours, limit=MAX_FRAME * 4)
        stream = _Stream(sid, reader, writer)
        self._streams[sid] = stream
        await self._enqueue(encode_frame(SYN, sid))
        stream.pump = asyncio.ensure_future(self._pump_local(stream))
        log.debug("%s smux stream %d opened", self._label, sid)
        return theirs

    async def feed(self, data: bytes) -> None:
        """Bytes from the agent, in order."""
        for frame in self._parser.feed(data):
            await self._on_frame(frame)

    async def _on_frame(self, frame: Frame) -> None:
        stream = self._streams.get(frame.sid)
        if frame.cmd == PSH and stream is not None and not stream.remote_done:
            if stream.deliver(frame.data) and stream.needs_drain():
                await self._drain(stream)
        elif frame.cmd == FIN and stream is not None:
            stream.remote_done = True
            await self._drain(stream)
            stream.close_local()
            self._forget_if_done(stream)
        elif frame.cmd == SYN:
            log.warning("%s agent opened smux stream %d; refusing it", self._label, frame.sid)
            await self._enqueue(encode_frame(FIN, frame.sid))

    async def _drain(self, stream: _Stream) -> None:
        try:
            await stream.writer.drain()
        except (ConnectionError, OSError):
            pass  # the local side went away; its pump sends FIN

    async def _pump_local(self, stream: _Stream) -> None:
        """Local socket -> PSH frames, then FIN when the local side closes."""
        try:
            while not self._closed:
                data = await stream.reader.read(MAX_FRAME)
                if not data:
                    break
                if stream.remote_done:
                    continue  # peer closed the stream: nowhere to send it
                await self._enqueue(encode_frame(PSH, stream.sid, data))
        except (ConnectionError, OSError):
            pass
        if not self._closed and not stream.remote_done:
            await self._enqueue(encode_frame(FIN, stream.sid))
        stream.local_done = True
        stream.close_local()
        self._forget_if_done(stream)

    def _forget_if_done(self, stream: _Stream) -> None:
        if stream.local_done and stream.remote_done and self._streams.get(stream.sid) is stream:
            del self._streams[stream.sid]
            log.debug("%s smux stream %d done", self._label, stream.sid)
        elif stream.remote_done and stream.pump is not None and stream.pump.done():
            self._streams.pop(stream.sid, None)

    async def _enqueue(self, frame: bytes) -> None:
        while len(self._outbox) >= OUTBOX_LIMIT and not self._closed:
            self._outbox_room.clear()
            await self._outbox_room.wait()
        if self._closed:
            raise ClosedError("the port-forward session is closed")
        self._outbox += frame
        self._outbox_ready.set()

    async def _writer_loop(self) -> None:
        while not self._closed:
            await self._outbox_ready.wait()
            self._outbox_ready.clear()
            while self._outbox:
                chunk = bytes(self._outbox)
                self._outbox.clear()
                self._outbox_room.set()
                try:
                    await self._send(chunk)
                except ClosedError:
                    return

    async def _keepalive_loop(self, interval: float) -> None:
        while not self._closed:
            await asyncio.sleep(interval)
            await self._enqueue(encode_frame(NOP, 0))

    async def close(self, reason: str = "") -> None:
        """Close every stream's local socket and stop; no frames are sent after this. With a
        ``reason`` (the session ended underneath), each open stream's end is logged with it."""
        if self._closed:
            return
        self._closed = True
        if reason:
            now = time.monotonic()
            for stream in self._streams.values():
                log.info("%s client connection on smux stream %d (open %.0f s) closed: %s", self._label, stream.sid, now - stream.opened, reason)
        self._outbox_room.set()
        self._outbox_ready.set()
        for stream in list(self._streams.values()):
            stream.close_local()
            if stream.pump is not None:
                stream.pump.cancel()
        self._streams.clear()
        for task in self._tasks:
            task.cancel()
