"""The daemon's control server: a Unix socket that serves the JSON-lines protocol.

It owns the socket (mode 0600 in a 0700 runtime directory), checks every peer's uid
(SO_PEERCRED on Linux, getpeereid on macOS/BSD) and runs one reader thread per client.
Bad input (not JSON, too long, unknown command) gets an error reply; a client that keeps
sending garbage, or reads its event stream too slowly, is dropped. The daemon never stops
because of a client. Commands are served by a ``dispatch(Request) -> result`` callable given
by the daemon; ``subscribe`` is served here: the reply carries a status snapshot and the
connection then receives every event published on the ``EventBus``.

Nobody can lock the owner out: a client must send a complete request within ``IDLE_TIMEOUT``
of connecting (or of its last answer), or it is dropped; when ``MAX_IDLE`` clients wait
without a request, the one idle longest is dropped to make room, so a new client that asks at
once (the CLI, the tray) is always served. Subscribers (the tray's event stream) are counted
apart (``MAX_SUBSCRIBERS``) and never dropped for idleness.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import itertools
import logging
import os
import queue
import selectors
import socket
import stat
import struct
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from . import protocol as P
from .errors import DbtunneldError, PermissionDeniedError
from .paths import short_socket_hint

log = logging.getLogger(__name__)

MAX_IDLE = 64                 # clients without a request; past it the longest idle is dropped
MAX_SUBSCRIBERS = 32          # event streams (trays) at once
IDLE_TIMEOUT = 10.0           # a client must send a complete request within this
MAX_BAD_LINES = 16            # consecutive bad lines before a client is dropped
EVENT_QUEUE = 512             # events buffered per subscriber before it is dropped as too slow
SEND_TIMEOUT = 5.0
SUN_PATH_MAX = 104 if sys.platform == "darwin" else 108

Dispatch = Callable[[P.Request], Any]


# ----------------------------------------------------------------------------- peer credentials

@dataclass(frozen=True)
class PeerCred:
    pid: int | None
    uid: int
    gid: int


def peer_credentials(sock: socket.socket) -> PeerCred | None:
    """The connecting process's uid (and pid where the OS tells); None when unknown."""
    if hasattr(socket, "SO_PEERCRED"):
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        pid, uid, gid = struct.unpack("3i", raw)
        return PeerCred(pid or None, uid, gid)
    return _getpeereid(sock)


def _getpeereid(sock: socket.socket) -> PeerCred | None:
    libc_name = ctypes.util.find_library("c")
    libc = ctypes.CDLL(libc_name, use_errno=True) if libc_name else None
    if libc is None or not hasattr(libc, "getpeereid"):
        return None
    uid, gid = ctypes.c_uint32(), ctypes.c_uint32()
    if libc.getpeereid(sock.fileno(), ctypes.byref(uid), ctypes.byref(gid)) != 0:
        return None
    return PeerCred(None, uid.value, gid.value)


# ----------------------------------------------------------------------------- socket setup

def prepare_runtime_dir(path: Path) -> None:
    """Create the runtime directory as 0700, or refuse one that another user owns."""
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    st = path.stat()
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid():
        raise PermissionDeniedError(f"{path} is not a directory owned by you",
                                    "remove it or point DBTUNNELD_HOME / XDG_RUNTIME_DIR elsewhere")
    if stat.S_IMODE(st.st_mode) != 0o700:
        log.warning("runtime directory %s had mode %o; setting 0700", path, stat.S_IMODE(st.st_mode))
        os.chmod(path, 0o700)


def bind_control_socket(path: Path) -> socket.socket:
    """Bind and listen on ``path`` (mode 0600); the caller holds the daemon lock, so a leftover is stale."""
    if len(os.fsencode(str(path))) >= SUN_PATH_MAX:
        raise PermissionDeniedError(f"control socket path {path} is longer than {SUN_PATH_MAX - 1} bytes",
                                    short_socket_hint())
    prepare_runtime_dir(path.parent)
    if path.exists() or path.is_symlink():
        path.unlink()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        os.chmod(path, 0o600)
        sock.listen(32)
    except OSError:
        sock.close()
        raise
    return sock


# ----------------------------------------------------------------------------- events

class EventBus:
    """Fan-out of daemon events to subscribers, each with its own bounded queue."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queues: list[queue.Queue] = []

    def subscribe(self, maxsize: int | None = None) -> queue.Queue:
        q: queue.Queue = queue.Queue(maxsize or EVENT_QUEUE)
        with self._lock:
            self._queues.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._queues:
                self._queues.remove(q)

    def publish(self, event: str, data: Any = None) -> None:
        line = P.encode_event(event, data)
        with self._lock:
            queues = list(self._queues)
        for q in queues:
            try:
                q.put_nowait(line)
            except queue.Full:
                self.unsubscribe(q)
                q.queue.clear()
                q.put_nowait(None)       # tells the writer to drop this slow client

    @property
    def subscribers(self) -> int:
        with self._lock:
            return len(self._queues)


# ----------------------------------------------------------------------------- one client

class _Connection:
    """One client: a reader thread serving requests, plus an event writer once subscribed."""

    def __init__(self, server: "ControlServer", sock: socket.socket, number: int) -> None:
        self.server, self.sock = server, sock
        self.ctx = f"[client={number}]"
        self._send_lock = threading.Lock()
        self._events: queue.Queue | None = None
        self._bad = 0
        self.idle_since = time.monotonic()
        self.busy = False                  # a request is being served
        self.closed = False
        self.answered = threading.Event()  # clear while a request is being answered
        self.answered.set()
        self.thread = threading.Thread(target=self.serve, name=f"control-client-{number}", daemon=True)

    def serve(self) -> None:
        try:
            if self.server._admit(self):
                self._read_loop()
        except OSError as exc:
            log.debug("%s connection error: %s", self.ctx, exc)
        finally:
            self.close()
            self.server._forget(self)

    def _read_loop(self) -> None:
        buf = P.LineBuffer(P.MAX_REQUEST_BYTES)
        while not self.server.closing:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                if self.idle_too_long():
                    log.info("%s dropped: no complete request within %g s", self.ctx, IDLE_TIMEOUT)
                    return
                continue
            if not data:
                if buf.pending:
                    log.info("%s closed in the middle of a line (%d bytes dropped)", self.ctx, buf.pending)
                return
            for line in buf.feed(data):
                if not self._serve_line(line):
                    return

    def _serve_line(self, line: bytes | P.Oversized) -> bool:
        if isinstance(line, P.Oversized):
            return self._reject(P.BadRequest("too_large", f"request of {line.size} bytes exceeds "
                                             f"the limit of {P.MAX_REQUEST_BYTES}"))
        try:
            request = P.parse_request(line)
        except P.BadRequest as exc:
            return self._reject(exc)
        self._bad = 0
        if request.cmd == "subscribe":
            return self._subscribe(request)
        self.busy = True
        try:
            self._answer(request)
        finally:
            self.busy, self.idle_since = False, time.monotonic()
        return True

    @property
    def idle(self) -> bool:
        """Waiting for a request: may be dropped when it takes too long or room is needed."""
        return self._events is None and not self.busy and not self.closed

    def idle_too_long(self) -> bool:
        return self.idle and time.monotonic() - self.idle_since > IDLE_TIMEOUT

    def _reject(self, exc: P.BadRequest) -> bool:
        self._bad += 1
        log.info("%s bad request (%s): %s", self.ctx, exc.kind, exc.message)
        self.send(P.encode_error(exc.id, exc.kind, exc.message, exc.hint))
        if self._bad >= MAX_BAD_LINES:
            log.warning("%s dropped after %d bad requests in a row", self.ctx, self._bad)
            return False
        return True

    def _answer(self, request: P.Request) -> None:
        log.debug("%s %s %s", self.ctx, request.cmd, sorted(request.args))
        self.answered.clear()
        try:
            try:
                line = P.encode_result(request.id, self.server.dispatch(request))
            except Exception as exc:  # every failure becomes a reply; the daemon keeps running
                self._log_failure(request, exc)
                payload = P.error_payload(exc)
                line = P.encode_error(request.id, **payload)
            self.send(line)
        finally:
            self.answered.set()

    def _log_failure(self, request: P.Request, exc: Exception) -> None:
        if isinstance(exc, DbtunneldError):
            log.info("%s %s failed: %s", self.ctx, request.cmd, exc.message)
        else:
            log.exception("%s %s failed with an internal error", self.ctx, request.cmd)

    def _subscribe(self, request: P.Request) -> bool:
        if self._events is not None:
            self.send(P.encode_error(request.id, "bad_args", "already subscribed"))
            return True
        if self.server.bus.subscribers >= MAX_SUBSCRIBERS:
            self.send(P.encode_error(request.id, "busy", f"too many event subscribers ({MAX_SUBSCRIBERS})",
                                     "close other dbtunneld trays; requests are still served"))
            return True
        self._events = self.server.bus.subscribe()
        self._answer(P.Request(request.id, "status", {}))
        threading.Thread(target=self._write_events, name=self.thread.name + "-events", daemon=True).start()
        log.info("%s subscribed to events", self.ctx)
        return True

    def _write_events(self) -> None:
        q = self._events
        while q is not None:
            line = q.get()
            if line is None or not self.send(line):
                break
        self.close()

    def send(self, line: bytes) -> bool:
        with self._send_lock:
            try:
                self.sock.sendall(line)
                return True
            except OSError as exc:
                log.info("%s send failed (%s); dropping the client", self.ctx, exc)
                return False

    def evict(self) -> None:
        """From another thread: end this client; its own thread closes the socket."""
        self.closed = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    def close(self) -> None:
        self.closed = True
        q, self._events = self._events, None
        if q is not None:
            self.server.bus.unsubscribe(q)
            q.put(None)
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


def _drain(sock: socket.socket, limit: int = 1 << 20, timeout: float = 1.0) -> None:
    """Half-close, then read what the peer already sent (bounded), so closing sends no reset
    that would destroy our reply before the peer reads it."""
    try:
        sock.shutdown(socket.SHUT_WR)
        sock.settimeout(timeout)
        while limit > 0:
            data = sock.recv(65536)
            if not data:
                return
            limit -= len(data)
    except OSError:
        pass


# ----------------------------------------------------------------------------- the server

class ControlServer:
    """Accepts clients on the control socket; ``start()`` returns once it is listening."""

    def __init__(self, path: Path, dispatch: Dispatch, bus: EventBus | None = None,
                 allowed_uid: int | None = None) -> None:
        self.path = Path(path)
        self.dispatch = dispatch
        self.bus = bus or EventBus()
        self.allowed_uid = os.getuid() if allowed_uid is None else allowed_uid
        self.closing = False
        self._listener: socket.socket | None = None
        self._wake_r, self._wake_w = socket.socketpair()
        self._clients: set[_Connection] = set()
        self._lock = threading.Lock()
        self._numbers = itertools.count(1)
        self._thread = threading.Thread(target=self._accept_loop, name="control-accept", daemon=True)

    def start(self) -> "ControlServer":
        self._listener = bind_control_socket(self.path)
        self._thread.start()
        log.info("control socket listening at %s", self.path)
        return self

    def __enter__(self) -> "ControlServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def clients(self) -> int:
        with self._lock:
            return len(self._clients)

    def _accept_loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self._listener, selectors.EVENT_READ)
        sel.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self.closing:
                for key, _ in sel.select():
                    if key.fileobj is self._listener and not self.closing:
                        self._accept_one()
        finally:
            sel.close()

    def _accept_one(self) -> None:
        try:
            sock, _ = self._listener.accept()
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                dropped = self._drop_idlest("out of file descriptors")
                if not dropped:
                    time.sleep(0.1)          # nothing to free now: don't spin on the listener
                return
            log.warning("accept failed: %s", exc)
            return
        sock.settimeout(SEND_TIMEOUT)
        conn = _Connection(self, sock, next(self._numbers))
        self._make_room()
        with self._lock:
            self._clients.add(conn)
        conn.thread.start()

    def _make_room(self) -> None:
        """Keep fewer than MAX_IDLE clients waiting without a request: drop the longest idle."""
        with self._lock:
            idle = sum(1 for c in self._clients if c.idle)
        if idle >= MAX_IDLE:
            self._drop_idlest(f"{idle} clients idle")

    def _drop_idlest(self, why: str) -> bool:
        with self._lock:
            idle = [c for c in self._clients if c.idle]
        if not idle:
            return False
        victim = min(idle, key=lambda c: c.idle_since)
        log.info("%s dropped to make room (%s; idle %.1f s)", victim.ctx, why, time.monotonic() - victim.idle_since)
        victim.evict()
        return True

    def _admit(self, conn: _Connection) -> bool:
        """On the client's thread: True if the peer may talk to us, else reply why and drain it."""
        try:
            peer = peer_credentials(conn.sock)
        except OSError:
            peer = None
        reason = self._refusal(peer)
        if reason is None:
            conn.ctx = f"{conn.ctx[:-1]} pid={peer.pid}]"
            return True
        log.warning("%s refused: %s", conn.ctx, reason[1])
        conn.send(P.encode_error(None, *reason))
        _drain(conn.sock)
        return False

    def _refusal(self, peer: PeerCred | None) -> tuple[str, str, str] | None:
        if peer is None:
            return ("permission_denied", "cannot tell who is connecting", "")
        if peer.uid != self.allowed_uid:
            return ("permission_denied", f"uid {peer.uid} (pid {peer.pid}) may not use this daemon",
                    f"the daemon belongs to uid {self.allowed_uid}; run your own with `dbtunneld daemon`")
        return None

    def _forget(self, conn: _Connection) -> None:
        with self._lock:
            self._clients.discard(conn)

    def close(self, timeout: float = 3.0, answer_grace: float = 2.0) -> None:
        """Stop accepting, let replies being answered go out (up to ``answer_grace`` s, e.g. the
        ``stop`` reply with the revocation report), drop every client, remove the socket file
        (idempotent)."""
        if self.closing:
            return
        self.closing = True
        self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._lock:
            clients = list(self._clients)
        end = time.monotonic() + answer_grace
        for c in clients:
            c.answered.wait(max(0.0, end - time.monotonic()))
        for c in clients:
            c.close()
        for c in clients:
            c.thread.join(timeout)
        self._release_socket()

    def _release_socket(self) -> None:
        if self._listener is not None:
            self._listener.close()
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
        self._wake_r.close()
        self._wake_w.close()
        log.info("control socket closed")
