"""A websocket client connection with batched writes, on websockets' sans-I/O protocol.

The data channel sends one acknowledgement per received message; written one by one, those
cost a system call each and dominated the profile. Here every frame queued during one turn of
the event loop goes out in a single ``transport.write``. Receiving is a queue of whole messages
with flow control (reading pauses while the consumer is behind), pings keep the connection
honest (a missing pong aborts it, which the channel treats as a drop and resumes); the pong
deadline is paused while reading is paused for back-pressure (the pong sits unread behind the
messages the consumer has not taken yet, and a slow consumer is not a dead connection).
Proxies (``HTTPS_PROXY`` / ``NO_PROXY``) and the CA bundle are chosen as AWS's tools do
(``netpath``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections import deque

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.uri import parse_uri

from . import netpath

# websockets logs handshake headers (signatures, the security token) and the URL's query at
# DEBUG; its protocol gets a logger of its own that never goes below INFO.
PROTOCOL_LOG = logging.getLogger("dbtunneld.adapters.ssm.wsclient.protocol")
PROTOCOL_LOG.setLevel(logging.INFO)

MAX_QUEUE = 256  # received messages before reading pauses
WRITE_HIGH_WATER = 1 << 20


class HandshakeError(Exception):
    """The server refused the websocket upgrade (``status`` holds its HTTP status, 0 if none)."""

    def __init__(self, message: str, status: int = 0) -> None:
        super().__init__(message)
        self.status = status


class WsClient(asyncio.Protocol):
    """One client websocket. ``await WsClient.connect(...)``, iterate for messages, ``send``, ``close``."""

    def __init__(self, url: str, max_size: int, ca_bundle: str | None = None) -> None:
        self._url = url
        self._ca_bundle = ca_bundle
        self._uri = parse_uri(url)
        self._protocol = ClientProtocol(self._uri, max_size=max_size, logger=PROTOCOL_LOG)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._handshake: asyncio.Future[Response] = self._loop.create_future()
        self._messages: deque[bytes | str] = deque()
        self._message_ready = asyncio.Event()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._reading_paused = False
        self._flush_scheduled = False
        self._fragments: list[bytes] = []
        self._fragment_text = False
        self._pongs: dict[bytes, asyncio.Future[None]] = {}
        self._pinger: asyncio.Task[None] | None = None
        self.closed = False
        self.close_code: int | None = None
        self.close_reason = ""

    # --- opening --------------------------------------------------------------------------------

    @classmethod
    async def connect(cls, url: str, headers: dict[str, str], *, open_timeout: float, max_size: int, ping_interval: float | None = None,
                      ca_bundle: str | None = None) -> "WsClient":
        client = cls(url, max_size, ca_bundle)
        try:
            await asyncio.wait_for(client._open(headers), open_timeout)
        except BaseException:
            client.abort()
            raise
        if ping_interval:
            client._pinger = asyncio.ensure_future(client._ping_loop(ping_interval))
        return client

    async def _open(self, headers: dict[str, str]) -> None:
        uri = self._uri
        context = netpath.tls_context(self._ca_bundle) if uri.secure else None
        tls_name = uri.host if context else None
        proxy = netpath.proxy_for(self._url)
        if proxy is None:
            await self._loop.create_connection(lambda: self, uri.host, uri.port, ssl=context, server_hostname=tls_name)
        else:
            sock = await netpath.open_tunnel(proxy, uri.host, uri.port, timeout=30.0)
            await self._loop.create_connection(lambda: self, sock=sock, ssl=context, server_hostname=tls_name)
        request = self._protocol.connect()
        for name, value in headers.items():
            request.headers[name] = value
        self._protocol.send_request(request)
        self._flush()
        response = await self._handshake
        if response.status_code != 101 or self._protocol.handshake_exc is not None:
            reason = response.body.decode(errors="replace")[:200] if response.body else response.reason_phrase
            raise HandshakeError(f"websocket upgrade refused: HTTP {response.status_code} {reason}", response.status_code)

    # --- asyncio.Protocol ---------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self._protocol.receive_data(data)
        self._take_events()
        self._flush()

    def eof_received(self) -> bool | None:
        self._protocol.receive_eof()
        self._take_events()
        self._flush()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._protocol.close_rcvd is not None:
            self.close_code = self._protocol.close_rcvd.code
            self.close_reason = self._protocol.close_rcvd.reason
        if not self._handshake.done():
            self._handshake.set_exception(ConnectionError(f"connection closed during the websocket upgrade: {exc or 'EOF'}"))
        for waiter in self._pongs.values():
            if not waiter.done():
                waiter.cancel()
        if self._pinger is not None:
            self._pinger.cancel()
        self._message_ready.set()
        self._can_write.set()

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def _take_events(self) -> None:
        for event in self._protocol.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)
            elif isinstance(event, Response) and not self._handshake.done():
                self._handshake.set_result(event)
        if len(self._messages) >= MAX_QUEUE and not self._reading_paused and self._transport is not None:
            self._reading_paused = True
            self._transport.pause_reading()

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode is Opcode.PONG:
            waiter = self._pongs.pop(bytes(frame.data), None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)
            return
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self._fragment_text = frame.opcode is Opcode.TEXT
            self._fragments = [frame.data]
        elif frame.opcode is Opcode.CONT:
            self._fragments.append(frame.data)
        else:
            return  # ping and close: the protocol answers them
        if frame.fin:
            data = b"".join(self._fragments) if len(self._fragments) > 1 else bytes(self._fragments[0])
            self._fragments = []
            self._messages.append(data.decode("utf-8", "replace") if self._fragment_text else data)
            self._message_ready.set()

    # --- writing --------------------------------------------------------------------------------

    def _flush(self) -> None:
        self._flush_scheduled = False
        transport = self._transport
        chunks = self._protocol.data_to_send()
        if transport is None or transport.is_closing():
            return
        data = [c for c in chunks if c]
        if data:
            transport.write(b"".join(data) if len(data) > 1 else data[0])
        if len(data) != len(chunks) and transport.can_write_eof():
            transport.write_eof()

    def _schedule_flush(self) -> None:
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._flush)

    def send_nowait(self, data: bytes | str) -> bool:
        """Queue a message (written with everything else queued this loop turn); False if closed."""
        if self.closed or self._protocol.state is not State.OPEN:
            return False
        if isinstance(data, str):
            self._protocol.send_text(data.encode())
        else:
            self._protocol.send_binary(data)
        self._schedule_flush()
        return True

    async def send(self, data: bytes | str) -> bool:
        """``send_nowait``, then wait while the transport's buffer is over its high-water mark."""
        if not self.send_nowait(data):
            return False
        if not self._can_write.is_set():
            await self._can_write.wait()
        return not self.closed

    # --- reading --------------------------------------------------------------------------------

    def __aiter__(self) -> "WsClient":
        return self

    async def __anext__(self) -> bytes | str:
        while not self._messages:
            if self.closed:
                raise StopAsyncIteration
            self._message_ready.clear()
            await self._message_ready.wait()
        message = self._messages.popleft()
        if self._reading_paused and len(self._messages) <= MAX_QUEUE // 4 and self._transport is not None:
            self._reading_paused = False
            self._transport.resume_reading()
        return message

    @property
    def reading_paused(self) -> bool:
        """True while reading is paused because the consumer is behind."""
        return self._reading_paused

    @property
    def backlog(self) -> int:
        """Messages received but not yet taken by the consumer."""
        return len(self._messages)

    # --- keepalive and closing --------------------------------------------------------------

    async def _ping_loop(self, interval: float) -> None:
        while not self.closed:
            await asyncio.sleep(interval)
            token = os.urandom(4)
            waiter = self._loop.create_future()
            self._pongs[token] = waiter
            if self._protocol.state is not State.OPEN:
                return
            self._protocol.send_ping(token)
            self._schedule_flush()
            if not await self._await_pong(waiter, interval):
                self.abort()
                return

    async def _await_pong(self, waiter: "asyncio.Future[None]", timeout: float) -> bool:
        """The pong within ``timeout`` s of time spent reading (back-pressure pauses the clock)."""
        deadline = self._loop.time() + timeout
        while True:
            step = max(0.0, min(deadline - self._loop.time(), 1.0))
            try:
                await asyncio.wait_for(asyncio.shield(waiter), step)
                return True
            except asyncio.TimeoutError:
                if self._reading_paused:
                    deadline = max(deadline, self._loop.time() + timeout)
                elif self._loop.time() >= deadline:
                    waiter.cancel()
                    return False
            except asyncio.CancelledError:
                if waiter.cancelled() and self.closed:
                    return True  # connection_lost cancelled it; the caller sees closed
                raise

    async def close(self, code: int = 1000, reason: str = "", timeout: float = 2.0) -> None:
        """The closing handshake, bounded by ``timeout``; then the connection is dropped."""
        if self._protocol.state is State.OPEN and self._transport is not None and not self._transport.is_closing():
            self._protocol.send_close(code, reason)
            self._flush()
            deadline = self._loop.time() + timeout
            while not self.closed and self._loop.time() < deadline:
                self._message_ready.clear()
                try:
                    await asyncio.wait_for(self._message_ready.wait(), max(0.01, deadline - self._loop.time()))
                except asyncio.TimeoutError:
                    break
        self.abort()

    def abort(self) -> None:
        if self._pinger is not None and self._pinger is not asyncio.current_task():
            self._pinger.cancel()
        if self._transport is not None and not self.closed:
            self._transport.abort()

