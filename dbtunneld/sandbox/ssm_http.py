"""A small asyncio HTTP/1.1 server with websocket upgrades, for the SSM stand-in.

One port serves both the JSON API (boto3 POSTs with bodies, which websockets' own server does
not accept) and the data-channel websockets: requests with ``Upgrade: websocket`` are handed to
websockets' sans-I/O ``ServerProtocol``; the rest go to an HTTP handler. Keep-alive is honoured
(botocore reuses connections). Part of the sandbox stand-in, not of the product.
"""

from __future__ import annotations

import asyncio
import json
import logging
import urllib.parse
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

log = logging.getLogger(__name__)
PROTOCOL_LOG = logging.getLogger(__name__ + ".protocol")  # never DEBUG: it would log tokens
PROTOCOL_LOG.setLevel(logging.INFO)

MAX_HEAD = 64 * 1024
MAX_BODY = 4 << 20
READ_SIZE = 256 * 1024
WRITE_HIGH_WATER = 1 << 20
MAX_WS_MESSAGE = 8 << 20
REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed", 500: "Internal Server Error"}


@dataclass
class HttpRequest:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes = b""
    head: bytes = field(default=b"", repr=False)

    @property
    def path(self) -> str:
        return urllib.parse.urlsplit(self.target).path

    @property
    def query(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(self.target).query))

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)

    def json(self) -> Any:
        return json.loads(self.body or b"{}")


@dataclass
class HttpResponse:
    status: int = 200
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def json(cls, value: Any, status: int = 200, content_type: str = "application/json", **headers: str) -> "HttpResponse":
        return cls(status, json.dumps(value, default=str).encode(), {"Content-Type": content_type, **headers})

    def encode(self, keep_alive: bool) -> bytes:
        lines = [f"HTTP/1.1 {self.status} {REASONS.get(self.status, 'Status')}"]
        headers = {**self.headers, "Content-Length": str(len(self.body)), "Connection": "keep-alive" if keep_alive else "close"}
        lines += [f"{k}: {v}" for k, v in headers.items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode() + self.body


class WsConnection:
    """A server-side websocket over an asyncio stream pair, driven by the sans-I/O protocol."""

    def __init__(self, request: HttpRequest, protocol: ServerProtocol, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.request = request
        self._protocol = protocol
        self._reader = reader
        self._writer = writer
        self._pending: deque[bytes | str] = deque()
        self._fragments: list[bytes] = []
        self._fragment_text = False
        self._flush_scheduled = False
        self.closed = False

    def __aiter__(self) -> "WsConnection":
        return self

    async def __anext__(self) -> bytes | str:
        while not self._pending:
            if self.closed or self._protocol.state is State.CLOSED:
                raise StopAsyncIteration
            try:
                data = await self._reader.read(READ_SIZE)
            except (ConnectionError, OSError):
                data = b""
            if not data:
                self._protocol.receive_eof()
                self._flush()
                self._mark_closed()
                raise StopAsyncIteration
            self._protocol.receive_data(data)
            self._collect()
            self._flush()
        return self._pending.popleft()

    def _collect(self) -> None:
        for event in self._protocol.events_received():
            if isinstance(event, Frame):
                self._on_frame(event)

    def _on_frame(self, frame: Frame) -> None:
        if frame.opcode in (Opcode.TEXT, Opcode.BINARY):
            self._fragment_text = frame.opcode == Opcode.TEXT
            self._fragments = [frame.data]
        elif frame.opcode == Opcode.CONT:
            self._fragments.append(frame.data)
        else:
            return  # ping/pong/close: the protocol answers them itself
        if frame.fin:
            data = b"".join(self._fragments)
            self._fragments = []
            self._pending.append(data.decode("utf-8", "replace") if self._fragment_text else data)

    def _flush(self) -> None:
        """Write everything the protocol queued, in one write (frames queued this loop turn)."""
        self._flush_scheduled = False
        chunks = self._protocol.data_to_send()
        if self._writer.is_closing():
            return
        data = [c for c in chunks if c]
        if data:
            self._writer.write(b"".join(data) if len(data) > 1 else data[0])
        if len(data) != len(chunks):
            self._mark_closed()
            self._writer.close()

    def _mark_closed(self) -> None:
        self.closed = True

    def send_nowait(self, data: bytes | str) -> bool:
        """Queue one message; False when the connection is no longer open."""
        if self.closed or self._protocol.state is not State.OPEN or self._writer.is_closing():
            return False
        if isinstance(data, str):
            self._protocol.send_text(data.encode())
        else:
            self._protocol.send_binary(data)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        return True

    async def send(self, data: bytes | str) -> bool:
        if not self.send_nowait(data):
            return False
        if self._writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            try:
                await self._writer.drain()
            except (ConnectionError, OSError):
                self._mark_closed()
                return False
        return True

    async def wait_writable(self) -> None:
        """Back-pressure: wait while more than the high-water mark is queued towards the client."""
        if not self.closed and self._writer.transport.get_write_buffer_size() > WRITE_HIGH_WATER:
            try:
                await self._writer.drain()
            except (ConnectionError, OSError):
                self._mark_closed()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """A clean close: close frame, then the TCP connection (without waiting long for the echo)."""
        if self._protocol.state is State.OPEN and not self._writer.is_closing():
            self._protocol.send_close(code, reason)
            self._flush()
        self._mark_closed()
        try:
            await asyncio.wait_for(self._writer.drain(), 1.0)
        except Exception:
            pass
        self._writer.close()

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (a network failure)."""
        self._mark_closed()
        self._writer.transport.abort()


HttpHandler = Callable[[HttpRequest], Awaitable[HttpResponse]]
WsAuthorizer = Callable[[HttpRequest], HttpResponse | None]
WsHandler = Callable[[WsConnection], Awaitable[None]]


class HttpServer:
    """Serves ``http_handler`` and, for upgrade requests approved by ``ws_authorize``, ``ws_handler``."""

    def __init__(self, http_handler: HttpHandler, ws_handler: WsHandler, ws_authorize: WsAuthorizer) -> None:
        self._http = http_handler
        self._ws = ws_handler
        self._authorize = ws_authorize
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task] = set()
        self.port = 0

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(self._connections, timeout=2.0)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        _nodelay(writer)
        try:
            while await self._serve_one(reader, writer):
                pass
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            self._connections.discard(task)
            writer.close()

    async def _serve_one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        request = await _read_request(reader)
        if request is None:
            return False
        if request.header("upgrade").lower() == "websocket":
            await self._upgrade(request, reader, writer)
            return False
        try:
            response = await self._http(request)
        except Exception:
            log.exception("stand-in: %s %s failed", request.method, request.path)
            response = HttpResponse.json({"message": "internal error"}, 500)
        keep_alive = request.header("connection").lower() != "close"
        writer.write(response.encode(keep_alive))
        await writer.drain()
        return keep_alive

    async def _upgrade(self, request: HttpRequest, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refusal = self._authorize(request)
        if refusal is not None:
            writer.write(refusal.encode(False))
            await writer.drain()
            return
        protocol = ServerProtocol(max_size=MAX_WS_MESSAGE, logger=PROTOCOL_LOG)
        protocol.receive_data(request.head)
        handshake = next((e for e in protocol.events_received() if not isinstance(e, Frame)), None)
        if handshake is None:
            return
        response = protocol.accept(handshake)
        protocol.send_response(response)
        for chunk in protocol.data_to_send():
            writer.write(chunk)
        await writer.drain()
        if response.status_code != 101:
            return
        await self._ws(WsConnection(request, protocol, reader, writer))


async def _read_request(reader: asyncio.StreamReader) -> HttpRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    lines = head.decode("latin-1").split("\r\n")
    method, target, _version = lines[0].split(" ", 2)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0") or 0)
    if length > MAX_BODY:
        raise ValueError("request body too large")
    body = await reader.readexactly(length) if length else b""
    return HttpRequest(method, target, headers, body, head)


def _nodelay(writer: asyncio.StreamWriter) -> None:
    import socket

    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
