"""Client side of the control socket, used by the CLI and the tray.

``Client.request(cmd, **args)`` sends one request on its own short connection (so it is safe
from any thread) and returns the result or raises the error the daemon described, rebuilt as
the matching exception of ``errors``. ``Client.subscribe()`` yields events until closed.
``ensure_daemon()`` starts a detached daemon when none answers and waits until it serves.
"""

from __future__ import annotations

import itertools
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from ..core.config import load_config
from ..core.errors import PermissionDeniedError, ProtocolError, TransientError
from ..core.paths import Paths, default_paths
from . import protocol as P

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT = 30.0
START_TIMEOUT = 20.0
_ids = itertools.count(1)


class DaemonNotRunning(TransientError):
    """Nothing answers on the control socket."""

    hint = "start it with `dbtunneld daemon`; `dbtunneld connect` and the tray start it for you"


class DaemonStartError(TransientError):
    """A daemon was started but did not become ready."""


def _connect(path: Path, timeout: float) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError):
        sock.close()
        raise DaemonNotRunning(f"no dbtunneld daemon is listening on {path}") from None
    except PermissionError:
        sock.close()
        raise PermissionDeniedError(f"cannot open the control socket {path}",
                                    "it belongs to another user; run the command as its owner") from None
    except OSError:
        sock.close()
        raise
    return sock


def _read_messages(sock: socket.socket, buf: P.LineBuffer) -> Iterator[P.Response | P.Event]:
    """Messages from the daemon until it closes the connection."""
    while True:
        data = sock.recv(65536)
        if not data:
            return
        for line in buf.feed(data):
            if isinstance(line, P.Oversized):
                raise ProtocolError(f"the daemon sent a message of {line.size} bytes (limit {buf.limit})")
            yield P.parse_message(line)


class Client:
    """Talks to one daemon through its control socket."""

    def __init__(self, socket_path: str | Path | None = None, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.socket_path = Path(socket_path) if socket_path else default_paths().socket_path
        self.timeout = timeout

    def request(self, cmd: str, *, timeout: float | None = None, **args: Any) -> Any:
        """Send one request; return its result or raise the error it carried."""
        wait = timeout if timeout is not None else self.timeout
        req_id = next(_ids)
        line = P.encode_request(req_id, cmd, args)
        sock = _connect(self.socket_path, wait)
        try:
            sock.sendall(line)
            return self._await_response(sock, req_id, cmd, wait)
        except TimeoutError:
            raise TransientError(f"the daemon did not answer `{cmd}` within {wait:g} s",
                                 "see `dbtunneld status`, or the daemon log") from None
        except (ConnectionResetError, BrokenPipeError):
            raise DaemonNotRunning("the daemon closed the connection (it may be stopping)") from None
        finally:
            sock.close()

    def _await_response(self, sock: socket.socket, req_id: int, cmd: str, wait: float) -> Any:
        for msg in _read_messages(sock, P.LineBuffer(P.MAX_MESSAGE_BYTES)):
            if isinstance(msg, P.Response) and (msg.id == req_id or msg.id is None):
                if msg.ok:
                    return msg.result
                raise P.error_from_payload(msg.error or {})
        raise DaemonNotRunning(f"the daemon closed the connection before answering `{cmd}`")

    def ping(self, timeout: float = 2.0) -> bool:
        """True when a daemon answers `status` (any error other than 'not running' counts as alive)."""
        try:
            self.request("status", timeout=timeout)
            return True
        except DaemonNotRunning:
            return False
        except PermissionDeniedError:
            raise
        except (TransientError, OSError):
            return False

    def subscribe(self) -> "Subscription":
        return Subscription(self.socket_path, self.timeout)


class Subscription:
    """An event stream: the first event is ``status`` with the current snapshot."""

    def __init__(self, socket_path: Path, timeout: float) -> None:
        self._sock = _connect(socket_path, timeout)
        self._sock.sendall(P.encode_request(next(_ids), "subscribe", {}))
        self._sock.settimeout(None)       # events may be minutes apart; close() ends the wait
        self._messages = _read_messages(self._sock, P.LineBuffer(P.MAX_MESSAGE_BYTES))
        self._closed = False

    def __iter__(self) -> Iterator[P.Event]:
        try:
            for msg in self._messages:
                if isinstance(msg, P.Event):
                    yield msg
                elif msg.ok:
                    yield P.Event("status", msg.result)
                else:
                    raise P.error_from_payload(msg.error or {})
        except OSError:
            if not self._closed:
                raise DaemonNotRunning("the daemon closed the event stream") from None

    def close(self) -> None:
        """End the stream; a thread blocked in iteration returns (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()

    def __enter__(self) -> "Subscription":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- starting a daemon

def daemon_command(config_path: str | Path | None = None) -> list[str]:
    cmd = [sys.executable, "-m", "dbtunneld.ui.cli"]
    if config_path:
        cmd += ["--config", str(config_path)]
    return cmd + ["daemon", "--background"]


def spawn_daemon(paths: Paths, config_path: str | Path | None = None) -> subprocess.Popen:
    """Start ``dbtunneld daemon`` detached from this terminal; stderr goes to a file in the log dir."""
    paths.ensure()
    err_path = paths.log_dir / "daemon.stderr"
    with open(err_path, "ab") as err:
        os.chmod(err_path, 0o600)
        kwargs: dict[str, Any] = {"start_new_session": True} if os.name == "posix" else {
            "creationflags": getattr(subprocess, "DETACHED_PROCESS", 0) | getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0)}
        proc = subprocess.Popen(daemon_command(config_path), stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=err, close_fds=True, **kwargs)
    threading.Thread(target=proc.wait, name="daemon-reaper", daemon=True).start()
    log.info("started dbtunneld daemon (pid %d)", proc.pid)
    return proc


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _last_words(paths: Paths) -> str:
    """The most telling line a dead daemon left: its last ERROR log line, else its stderr's last line."""
    errors_logged = [ln for ln in _tail(paths.log_file, 50).splitlines() if " ERROR " in ln]
    if errors_logged:
        return errors_logged[-1].split(": ", 1)[-1]
    stderr = _tail(paths.log_dir / "daemon.stderr").splitlines()
    return stderr[-1] if stderr else "no output"


def wait_ready(client: Client, proc: subprocess.Popen | None, deadline: float, paths: Paths) -> None:
    """Poll until the daemon answers; fail early with its last words if it exits."""
    while time.monotonic() < deadline:
        if client.ping(timeout=2.0):
            return
        if proc is not None and proc.poll() is not None and not client.ping(timeout=2.0):
            raise DaemonStartError(f"the daemon exited with code {proc.returncode}: {_last_words(paths)}",
                                   f"see {paths.log_file}; `dbtunneld daemon` in a terminal shows why")
        time.sleep(0.05)
    raise DaemonStartError("the daemon did not become ready in time", f"see {paths.log_file}")


def ensure_daemon(paths: Paths | None = None, config_path: str | Path | None = None,
                  timeout: float = START_TIMEOUT) -> Client:
    """A client of a running daemon, starting one (detached) when none answers."""
    paths = paths or default_paths()
    client = Client(paths.socket_path)
    if client.ping():
        return client
    load_config(config_path or paths.config_file)     # a bad config: every problem now, not a dead daemon
    proc = spawn_daemon(paths, config_path)
    wait_ready(client, proc, time.monotonic() + timeout, paths)
    return client
