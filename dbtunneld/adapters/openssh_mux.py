"""OpenSSH's connection-multiplexing protocol, client side: hand a client socket to a ControlMaster.

The daemon does not move the bytes of a client connection itself: it passes the accepted socket
to an ``ssh -M`` master, which forwards it through its SSH connection in C. Our own wire code,
written from openssh-portable:

* PROTOCOL.mux sections 1 (hello, version 4), 3 (MUX_C_NEW_STDIO_FWD), 4 (MUX_C_ALIVE_CHECK),
  10 (status replies) and 11 (numbers). Every message is ``uint32 length`` + ``uint32 type`` + body.
* mux.c ``mux_master_read_cb``: the master sends its hello first (with an "info" extension) and
  drops a client whose first message is not a hello.
* mux.c ``mux_master_process_stdio_fwd``: the connect port is read as a ``uint32`` (PROTOCOL.mux
  says "string"; the code is what runs), then two descriptors, each by its own ``mm_receive_fd``
  (monitor_fdpass.c: one SCM_RIGHTS message of exactly one fd with one byte of data); one stdio
  forward per control connection.
* mux.c ``mux_stdio_confirm``: the reply (MUX_S_SESSION_OPENED or MUX_S_FAILURE) waits for the
  bastion's answer to the ``direct-tcpip`` open.
* mux.c ``mux_master_session_cleanup_cb``: the master closes the control connection when the
  forward ends; ``mux_master_control_cleanup_cb``: closing it ends the forward. The client side
  of the same steps is ``mux_client_hello_exchange``, ``mux_client_request_alive`` and
  ``mux_client_request_stdio_fwd``.

``forward_client_async`` is the same hand-over on the caller's asyncio loop (the engine loop):
no thread waits on the master or the bastion while a client connection is handed over.
``EndWatcher`` is one selector thread per master that notices forwards ending (it wakes only then).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import selectors
import socket
import struct
import threading
import time
from typing import Callable

from ..core.errors import ClosedError, ProtocolError, TransientError

log = logging.getLogger(__name__)

MUX_MSG_HELLO = 0x00000001
MUX_C_ALIVE_CHECK = 0x10000004
MUX_C_NEW_STDIO_FWD = 0x10000008
MUX_S_OK = 0x80000001
MUX_S_PERMISSION_DENIED = 0x80000002
MUX_S_FAILURE = 0x80000003
MUX_S_ALIVE = 0x80000005
MUX_S_SESSION_OPENED = 0x80000006
MUX_VERSION = 4
MAX_MESSAGE = 256 * 1024          # mux.c caps a message at 256 KiB as well (mux_client_read_packet)


class MuxRefusedError(TransientError):
    """The master (or the bastion behind it) refused the request: MUX_S_FAILURE / PERMISSION_DENIED."""


# ---- wire ----------------------------------------------------------------------------------------

def _u32(value: int) -> bytes:
    return struct.pack(">I", value)


def _string(value: str | bytes) -> bytes:
    data = value.encode() if isinstance(value, str) else value
    return _u32(len(data)) + data


def _message(kind: int, *fields: bytes) -> bytes:
    body = _u32(kind) + b"".join(fields)
    return _u32(len(body)) + body


class _Body:
    """Reads the fields of one received message."""

    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def u32(self) -> int:
        if self.at + 4 > len(self.data):
            raise ProtocolError("mux: message cut short")
        value: int = struct.unpack_from(">I", self.data, self.at)[0]
        self.at += 4
        return value

    def string(self) -> str:
        n = self.u32()
        if self.at + n > len(self.data):
            raise ProtocolError("mux: string cut short")
        value = self.data[self.at:self.at + n]
        self.at += n
        return value.decode(errors="replace")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ClosedError("the ssh master closed the control connection")
        buf += chunk
    return bytes(buf)


def read_message(sock: socket.socket) -> tuple[int, _Body]:
    (length,) = struct.unpack(">I", _recv_exact(sock, 4))
    if not 4 <= length <= MAX_MESSAGE:
        raise ProtocolError(f"mux: bad message length {length}")
    body = _Body(_recv_exact(sock, length))
    return body.u32(), body


def check_hello(kind: int, body: _Body) -> None:
    if kind != MUX_MSG_HELLO:
        raise ProtocolError(f"mux: expected the master's hello, got 0x{kind:08x}")
    version = body.u32()
    if version != MUX_VERSION:
        raise ProtocolError(f"mux: the ssh master speaks protocol {version}, not {MUX_VERSION}",
                            hint="use OpenSSH 5.9 or newer")


def check_reply(kind: int, body: _Body, rid: int, *wanted: int) -> _Body:
    """The body of the reply to request ``rid``; a refusal as MuxRefusedError."""
    if kind in (MUX_S_FAILURE, MUX_S_PERMISSION_DENIED):
        body.u32()
        raise MuxRefusedError(f"the ssh master refused: {body.string()}")
    if kind not in wanted:
        raise ProtocolError(f"mux: unexpected reply 0x{kind:08x}")
    if body.u32() != rid:
        raise ProtocolError("mux: reply to another request")
    return body


# ---- one control connection ----------------------------------------------------------------------

class MuxConnection:
    """A control connection to a master, past the hello exchange."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._next_id = 1

    @classmethod
    def open(cls, control_path: str, timeout: float, first: bytes = b"",
             fds: tuple[int, ...] = ()) -> "MuxConnection":
        """Connect and exchange hellos. ``first`` (a request) and its ``fds`` are sent right after
        our hello, before the master's is read: the master reads one whole message at a time
        (channels.c ``read_mux``), so this saves a round trip per client connection."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(timeout)
        try:
            sock.connect(control_path)
            conn = cls(sock)
            sock.sendall(_message(MUX_MSG_HELLO, _u32(MUX_VERSION)) + first)
            for fd in fds:
                socket.send_fds(sock, [b"\0"], [fd])
            conn._read_hello()
        except socket.timeout:
            sock.close()
            raise TransientError("the ssh master did not answer on its control socket in time") from None
        except OSError as exc:
            sock.close()
            raise TransientError(f"cannot reach the ssh master's control socket: {exc.strerror or exc}") from None
        except BaseException:
            sock.close()
            raise
        return conn

    def _read_hello(self) -> None:
        check_hello(*read_message(self.sock))

    def _request_id(self) -> int:
        rid, self._next_id = self._next_id, self._next_id + 1
        return rid

    def _reply(self, rid: int, *wanted: int) -> _Body:
        kind, body = read_message(self.sock)
        return check_reply(kind, body, rid, *wanted)

    def alive_check(self) -> int:
        """The master's pid, when it answers (MUX_C_ALIVE_CHECK -> MUX_S_ALIVE)."""
        rid = self._request_id()
        self.sock.sendall(_message(MUX_C_ALIVE_CHECK, _u32(rid)))
        return self._reply(rid, MUX_S_ALIVE).u32()

    @staticmethod
    def stdio_forward_request(rid: int, host: str, port: int) -> bytes:
        """MUX_C_NEW_STDIO_FWD; the stream's fd follows twice (stdin, stdout), one SCM_RIGHTS each."""
        return _message(MUX_C_NEW_STDIO_FWD, _u32(rid), _string(""), _string(host), _u32(port))

    def stdio_forward_reply(self, rid: int) -> int:
        """The session id once the bastion opened the channel (MUX_S_SESSION_OPENED)."""
        return self._reply(rid, MUX_S_SESSION_OPENED).u32()

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass


def alive_check(control_path: str, timeout: float) -> int:
    """One health check on a fresh control connection: the master's pid."""
    conn = MuxConnection.open(control_path, timeout)
    try:
        return conn.alive_check()
    except socket.timeout:
        raise TransientError(f"the ssh master did not answer an alive check within {timeout:g} s") from None
    except OSError as exc:
        raise TransientError(f"alive check on the ssh master failed: {exc}") from None
    finally:
        conn.close()


# ---- forwards and their ends ---------------------------------------------------------------------

class MuxForward:
    """One client connection forwarded by the master. ``close()`` ends it (idempotent); ``done``
    is set when it has ended either way. ``received`` stays 0: the bytes never pass through us."""

    received = 0

    def __init__(self, conn: MuxConnection, session_id: int, label: str) -> None:
        self._conn = conn
        self.session_id = session_id
        self.label = label
        self.generation = 0
        self.done = threading.Event()
        self.watcher: "EndWatcher | None" = None
        self._on_end: list[Callable[["MuxForward"], None]] = []
        self._lock = threading.Lock()

    @property
    def ended(self) -> bool:
        return self.done.is_set()

    @property
    def sock(self) -> socket.socket:
        return self._conn.sock

    def on_end(self, callback: Callable[["MuxForward"], None]) -> None:
        """Call ``callback(self)`` once it ends (at once if it has ended already)."""
        with self._lock:
            if not self.done.is_set():
                self._on_end.append(callback)
                return
        callback(self)

    def ended_by_master(self) -> None:
        self._finish()

    def close(self) -> None:
        self._finish()

    abort = close

    def _finish(self) -> None:
        with self._lock:               # ordered with EndWatcher.watch: see there
            if self.done.is_set():
                return
            self.done.set()
            callbacks, self._on_end = self._on_end, []
            watcher = self.watcher
        if watcher is not None:
            watcher.forget(self)
        self._conn.close()          # the master sees EOF and ends the channel (control cleanup)
        for callback in callbacks:
            try:
                callback(self)
            except Exception:
                log.exception("%s: end callback failed", self.label)


class EndWatcher:
    """One thread per master, asleep in a selector over the control connections of its forwards;
    anything readable (EOF: the protocol sends nothing more) means the forward ended. Forwards
    are registered from the caller's thread (epoll/kqueue allow it while another thread waits)."""

    def __init__(self, name: str) -> None:
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def watch(self, forward: "MuxForward") -> None:
        """Watch ``forward`` until it ends (ended at once when the watcher has closed).

        Registered and given its ``watcher`` under the forward's own lock, which ``_finish`` holds
        while it marks the end and reads ``watcher``: a forward this thread's select reports at
        once (its master ended it already) is unregistered before its socket closes. Once the
        other way round (registered, ended by the select thread, ``watcher`` set afterwards), its
        fd number stayed registered after the close; the next forward given that number raised
        KeyError ("already registered") and was never closed."""
        with self._lock:
            with forward._lock:
                registered = not self._closed and not forward.done.is_set()
                if registered:
                    forward.watcher = self
                    self._selector.register(forward.sock, selectors.EVENT_READ, forward)
        if not registered:
            forward.close()

    def forget(self, forward: "MuxForward") -> None:
        """Before its socket is closed (a reused fd number must not meet a stale registration);
        only its own registration (never another forward's on a reused fd number)."""
        with self._lock:
            if self._closed:
                return
            try:
                if self._selector.get_key(forward.sock).data is forward:
                    self._selector.unregister(forward.sock)
            except (KeyError, ValueError):
                pass

    def _run(self) -> None:
        while True:
            events = self._selector.select()
            if self._closed:
                break
            for key, _ in events:
                if key.data is not None:
                    key.data.ended_by_master()
        self._end_all()

    def _end_all(self) -> None:
        with self._lock:
            forwards = [key.data for key in self._selector.get_map().values() if key.data is not None]
            self._selector.close()
        for forward in forwards:
            forward.watcher = None
            forward.close()
        self._wake_r.close()
        self._wake_w.close()

    def close(self, timeout: float = 5.0) -> None:
        """End every watched forward and the thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)


def forward_client(control_path: str, client: socket.socket, host: str, port: int, timeout: float,
                   label: str) -> MuxForward:
    """Hand ``client`` to the master for host:port; the caller may close its own copy afterwards
    (the master holds its own copies from here on). Blocking: see ``forward_client_async``."""
    rid = 1
    request = MuxConnection.stdio_forward_request(rid, host, port)
    conn = MuxConnection.open(control_path, timeout, request, (client.fileno(), client.fileno()))
    started = time.monotonic()
    try:
        session = conn.stdio_forward_reply(rid)
    except BaseException as exc:
        conn.close()
        raise _forward_failed(exc, host, port, time.monotonic() - started) from None
    conn.sock.settimeout(None)
    return MuxForward(conn, session, label)


def _forward_failed(exc: BaseException, host: str, port: int, waited: float) -> BaseException:
    """What a failed hand-over raises (one place for the blocking and the asyncio path)."""
    if isinstance(exc, (socket.timeout, asyncio.TimeoutError)):
        return TransientError(f"the bastion did not open a channel to {host}:{port} within {waited:.1f} s")
    if isinstance(exc, MuxRefusedError):
        return MuxRefusedError(f"cannot forward to {host}:{port}: {exc.message}",
                               hint="check that the bastion may reach it (PermitOpen / security groups)")
    if isinstance(exc, ConnectionRefusedError | FileNotFoundError):
        return TransientError(f"cannot reach the ssh master's control socket: {exc.strerror or exc}")
    if isinstance(exc, OSError):
        return TransientError(f"the ssh master failed while forwarding to {host}:{port}: {exc}")
    return exc


async def forward_client_async(control_path: str, client: socket.socket, host: str, port: int,
                               timeout: float, label: str) -> MuxForward:
    """``forward_client`` on the running asyncio loop: connect, hello + request + the two fds,
    the master's hello, its reply; each step waits on the loop, the whole within ``timeout``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    started = time.monotonic()
    try:
        session = await asyncio.wait_for(_hand_over(sock, control_path, client.fileno(), host, port), timeout)
    except BaseException as exc:
        sock.close()
        raise _forward_failed(exc, host, port, time.monotonic() - started) from None
    sock.setblocking(True)
    return MuxForward(MuxConnection(sock), session, label)


async def _hand_over(sock: socket.socket, control_path: str, fd: int, host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    await _connect_unix(sock, control_path)
    rid = 1
    await loop.sock_sendall(sock, _message(MUX_MSG_HELLO, _u32(MUX_VERSION))
                            + MuxConnection.stdio_forward_request(rid, host, port))
    for _ in range(2):                         # stdin, stdout: the same socket
        await _send_fd(sock, fd)
    check_hello(*await _read_message_async(sock))
    return check_reply(*await _read_message_async(sock), rid, MUX_S_SESSION_OPENED).u32()


async def _connect_unix(sock: socket.socket, path: str) -> None:
    """A non-blocking AF_UNIX connect fails with EAGAIN while the master's backlog is full
    (it never completes later, unlike TCP's EINPROGRESS): try again on the next turns."""
    while True:
        try:
            sock.connect(path)
            return
        except BlockingIOError as exc:
            if exc.errno != errno.EAGAIN:
                raise
        await asyncio.sleep(0.002)


async def _send_fd(sock: socket.socket, fd: int) -> None:
    """One SCM_RIGHTS message of one fd and one byte (monitor_fdpass.c ``mm_receive_fd``)."""
    while True:
        try:
            socket.send_fds(sock, [b"\0"], [fd])
            return
        except BlockingIOError:
            await _writable(sock)


async def _writable(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)
    loop.add_writer(sock.fileno(), wake)
    try:
        await ready
    finally:
        loop.remove_writer(sock.fileno())


async def _read_message_async(sock: socket.socket) -> tuple[int, _Body]:
    (length,) = struct.unpack(">I", await _recv_exact_async(sock, 4))
    if not 4 <= length <= MAX_MESSAGE:
        raise ProtocolError(f"mux: bad message length {length}")
    body = _Body(await _recv_exact_async(sock, length))
    return body.u32(), body


async def _recv_exact_async(sock: socket.socket, n: int) -> bytes:
    loop = asyncio.get_running_loop()
    buf = bytearray()
    while len(buf) < n:
        chunk = await loop.sock_recv(sock, n - len(buf))
        if not chunk:
            raise ClosedError("the ssh master closed the control connection")
        buf += chunk
    return bytes(buf)
