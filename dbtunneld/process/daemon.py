"""`dbtunneld daemon`: the one process per user that owns every tunnel and credential.

Lifecycle: take the per-user lock, set up logging (rotating file in the log directory, stderr
in the foreground, secrets masked), load the config, start the supervisor (the engine
revokes leases orphaned by a crash), serve the control socket, tell systemd READY=1. SIGHUP
and the ``reload`` command validate the new config first and reconcile; an invalid config is
refused whole and the old one keeps running. SIGTERM / SIGINT / ``stop`` stop within a bound:
tunnels closed, leases and token revoked, socket removed, STOPPING=1 sent.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..adapters import log as logsetup
from ..adapters.catalog import with_catalog
from ..core.config import Config, load_config
from ..core.errors import ConfigError, DbtunneldError, NeedsUserError
from ..engine.engine_loop import EngineLoop
from . import protocol as P
from .control import ControlServer, EventBus
from ..core.exitcodes import EXIT_ALREADY_RUNNING, EXIT_CONFIG, EXIT_FAIL, EXIT_OK  # noqa: F401
from ..core.paths import Paths
from ..engine.supervisor import POOL_WORKERS, Supervisor
from ..engine.units import EngineFactory, TunnelFactory

log = logging.getLogger(__name__)

STOP_TIMEOUT = 20.0
LOG_MAX_BYTES = 5 * 1024 * 1024
LOG_BACKUPS = 3
QUIET_LOGGERS = ("paramiko", "botocore", "boto3", "urllib3", "hvac", "websockets")


# ----------------------------------------------------------------------------- single instance

class AlreadyRunningError(NeedsUserError):
    """Another daemon of this user holds the lock."""

    hint = "use `dbtunneld status`, or `dbtunneld stop` before starting another"


class InstanceLock:
    """An exclusive lock on a file (flock / msvcrt), released by the OS if we crash."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    def acquire(self) -> "InstanceLock":
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        if not _try_lock(fd):
            os.close(fd)
            holder = self.holder_pid()
            raise AlreadyRunningError(f"a dbtunneld daemon is already running{f' (pid {holder})' if holder else ''}")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def holder_pid(self) -> int | None:
        try:
            return int(self.path.read_text().strip() or 0) or None
        except (OSError, ValueError):
            return None

    def release(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)              # closing drops the lock; the file stays (others may be waiting on it)

    def __enter__(self) -> "InstanceLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _try_lock(fd: int) -> bool:
    if os.name == "nt":
        import msvcrt
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
            return True
        except OSError:
            return False
    import fcntl
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


# ----------------------------------------------------------------------------- systemd, logging

def sd_notify(message: str, env: dict[str, str] | None = None) -> bool:
    """Send ``message`` (e.g. "READY=1") to systemd when NOTIFY_SOCKET is set; True when sent."""
    addr = (env if env is not None else os.environ).get("NOTIFY_SOCKET", "")
    if not addr or not addr.startswith(("/", "@")):
        return False
    target = "\0" + addr[1:] if addr.startswith("@") else addr
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(target)
            s.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("could not notify systemd (%s): %s", message, exc)
        return False


def setup_daemon_logging(paths: Paths, foreground: bool, level: int = logging.INFO) -> None:
    """Rotating 0600 file in the log directory, plus stderr in the foreground; secrets masked."""
    logsetup.setup_logging(paths.log_file, level=level, stderr=foreground,
                           max_bytes=LOG_MAX_BYTES, backups=LOG_BACKUPS)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


# ----------------------------------------------------------------------------- the daemon

@dataclass
class Factories:
    engine: EngineFactory
    tunnel: TunnelFactory


def default_factories() -> Factories:
    from ..engine.wiring import engine_factory, tunnel_factory
    return Factories(engine_factory, tunnel_factory)


class Daemon:
    """Wires the supervisor to the control socket and runs until asked to stop."""

    def __init__(self, paths: Paths, config_path: str | Path, factories: Factories | None = None,
                 stop_timeout: float = STOP_TIMEOUT) -> None:
        self.paths = paths
        self.config_path = Path(config_path)
        self.factories = factories
        self.stop_timeout = stop_timeout
        self.engine = EngineLoop(name="dbtunneld-engine", workers=POOL_WORKERS)   # the control plane's one loop (issue 16)
        self.bus = EventBus(self.engine)
        self.lock = InstanceLock(paths.lock_path)
        self.supervisor: Supervisor | None = None
        self.server: ControlServer | None = None
        self._wake_r, self._wake_w = os.pipe()     # self-pipe: safe to write from a signal handler
        os.set_blocking(self._wake_w, False)
        self._stop_requested = False
        self._reload_requested = False
        self._reload_lock = threading.Lock()
        self.signals: list[str] = []               # names of signals received, logged by the main loop
        self.clean_stop = True
        self.revocation: list[dict] | None = None  # what became of each DB user, once stopped
        self._stopped = threading.Event()          # set when the supervisor stopped (``stop`` waiters)
        self._ssm_sweep_stop = threading.Event()

    # ---- start and run

    def start(self) -> "Daemon":
        """Lock, load the config, start the units and the control socket (raises on failure)."""
        self.paths.ensure()
        try:
            self.lock.acquire()
        except BaseException:
            self.engine.stop()          # never started: closes the loop
            raise
        try:
            self._end_leftover_ssh_masters()      # before any tunnel starts one
            self.engine.start()
            config = self._load_config()
            factories = self.factories or default_factories()
            self.supervisor = Supervisor(config, self.paths, engine_factory=factories.engine,
                                         tunnel_factory=factories.tunnel, on_event=self.bus.publish,
                                         config_path=str(self.config_path), engine_loop=self.engine)
            ssm_sessions = self._record_ssm_sessions()  # before any tunnel can start a session
            self.supervisor.start()
            self._end_leftover_ssm_sessions(ssm_sessions, config)
            self.server = ControlServer(self.paths.socket_path, self.dispatch, self.bus, engine=self.engine).start()
        except BaseException:
            self._abort_start()
            raise
        sd_notify("READY=1")
        log.info("dbtunneld daemon ready (pid %d, config %s)", os.getpid(), self.config_path)
        return self

    def _end_leftover_ssh_masters(self) -> None:
        """``ssh -M`` masters a killed earlier life of this daemon left (its records in our runtime
        dir; never another daemon's or any other ssh), stopped by pid; new masters recorded there."""
        from ..adapters import openssh_leftovers
        from ..adapters.openssh_transport import MASTERS
        openssh_leftovers.end_leftover_masters(self.paths.runtime_dir)
        MASTERS.use_runtime_dir(self.paths.runtime_dir)

    def _record_ssm_sessions(self) -> Any:
        from ..adapters.ssm import session_registry
        return session_registry.install_for_daemon(self.paths.state_dir)

    def _end_leftover_ssm_sessions(self, registry: Any, config: Config) -> None:
        """TerminateSession for the SSM sessions a crashed run left open (in a thread)."""
        from ..adapters.ssm import session_registry

        def boto3_session() -> Any:                 # asked at each try: sign-in may come later
            assert self.supervisor is not None
            return self.supervisor.aws_session()
        session_registry.sweep_for_daemon(registry, config.aws, boto3_session, self._ssm_sweep_stop)

    def _abort_start(self) -> None:
        if self.supervisor is not None:
            self.supervisor.stop(self.stop_timeout)
        self.engine.stop()
        self.lock.release()

    def serve_forever(self) -> None:
        """Block until a stop is requested; run requested reloads on this (the main) thread."""
        while True:
            os.read(self._wake_r, 64)
            while self.signals:
                log.info("%s received", self.signals.pop(0))
            if self._stop_requested:
                return
            if self._reload_requested:
                self._reload_requested = False
                self._reload_logged()

    def request_stop(self) -> None:
        """Safe from any thread and from a signal handler (no locks taken)."""
        self._stop_requested = True
        self._poke()

    def request_reload(self) -> None:
        self._reload_requested = True
        self._poke()

    def _poke(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass                        # the pipe is full: the main loop has wake-ups pending anyway

    def shutdown(self) -> bool:
        """Stop everything within ``stop_timeout``; True when it finished in time."""
        sd_notify("STOPPING=1")
        log.info("stopping: closing tunnels and revoking leases (bound %.0f s)", self.stop_timeout)
        self.bus.publish("stopping", {"pid": os.getpid()})
        self._ssm_sweep_stop.set()
        finished = self._stop_supervisor()
        if self.server is not None:
            self.server.close()
        self.engine.stop()                      # last: the supervisor and the server ran on it
        self.lock.release()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)
        log.info("daemon stopped%s", "" if finished else " (timed out: leases left are revoked at next start)")
        return finished

    def _stop_supervisor(self) -> bool:
        if self.supervisor is None:
            self._stopped.set()
            return True

        def stop() -> None:
            self.revocation = self.supervisor.stop(self.stop_timeout)

        t = threading.Thread(target=stop, name="shutdown", daemon=True)
        t.start()
        t.join(self.stop_timeout + 2.0)
        self._stopped.set()                     # ``stop`` requests answer now, before the socket closes
        return not t.is_alive()

    def _stop_command(self, args: dict[str, Any]) -> dict[str, Any]:
        """Ask the main loop to stop; with ``wait``, answer once the leases are revoked, with an
        outcome per DB user (``revocation``; None when the stop did not finish in ``wait``)."""
        self.request_stop()
        wait = float(args.get("wait", 0.0))
        reply: dict[str, Any] = {"stopping": True, "pid": os.getpid()}
        if wait > 0:
            reply["revocation"] = self.revocation if self._stopped.wait(wait) else None
        return reply

    # ---- reload

    def reload(self) -> dict[str, Any]:
        """Validate the config file, then reconcile; ConfigError leaves everything as it was."""
        with self._reload_lock:
            new = self._load_config()
            summary = self.supervisor.reload(new)
        self.bus.publish("reloaded", summary)
        return summary

    def _load_config(self) -> Config:
        """config.toml plus the team catalog it names (``dbtunneld.adapters.catalog``)."""
        return with_catalog(load_config(self.config_path), self.paths.ports_file, self.paths.state_dir)

    def _reload_logged(self) -> None:
        log.info("reloading %s", self.config_path)
        try:
            self.reload()
        except ConfigError as exc:
            log.error("reload refused, the running config stays:\n%s", exc.message)
        except Exception:
            log.exception("reload failed; the running config stays")

    # ---- commands

    def dispatch(self, req: P.Request) -> Any:
        handler = self._commands().get(req.cmd)
        if handler is None:
            raise P.BadRequest("unknown_command", f"unknown command {req.cmd!r}", id=req.id)
        return handler(req.args)

    def _commands(self) -> dict[str, Callable[[dict[str, Any]], Any]]:
        sup = self.supervisor
        return {
            "status": lambda a: sup.status_dict(),
            "connect": lambda a: {"tunnels": sup.connect(_targets(a), float(a.get("wait", 0.0)))},
            "disconnect": lambda a: sup.disconnect_report(_targets(a)),
            "reconnect": lambda a: {"reconnecting": sup.reconnect(_targets(a))},
            "creds": lambda a: sup.creds(a["name"], a.get("field", "username")),
            "renew": lambda a: {"renewed": sup.renew(a.get("name"), bool(a.get("rotate", False)))},
            "reset_password": lambda a: sup.reset_local_password(a["name"]),
            "login": lambda a: sup.login(float(a.get("wait", 0.0)), bool(a.get("use_device_code", False))),
            "reload": lambda a: self.reload(),
            "stop": self._stop_command,
        }


def _targets(args: dict[str, Any]) -> list[str] | None:
    return None if args.get("all") else [args["name"]]


# ----------------------------------------------------------------------------- entry point

def install_signal_handlers(daemon: Daemon) -> None:
    """SIGTERM / SIGINT stop, SIGHUP reloads. Handlers only set flags (no locks, no logging);
    a second Ctrl-C (SIGINT) while stopping exits at once, leaving leases for the next start."""
    def on_stop(signum, frame):
        if daemon._stop_requested and signum == signal.SIGINT:
            os.write(2, b"dbtunneld: second Ctrl-C, exiting now; leftover leases are revoked at next start\n")
            os._exit(130)
        daemon.signals.append(signal.Signals(signum).name)
        daemon.request_stop()

    def on_hup(signum, frame):
        daemon.signals.append("SIGHUP")
        daemon.request_reload()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    if hasattr(signal, "SIGHUP"):
        signal.signal(signal.SIGHUP, on_hup)
    # The kernel may deliver a signal to any thread; then only this fd wakes the main loop's read
    # (the Python handler runs once the main thread executes bytecode again).
    signal.set_wakeup_fd(daemon._wake_w, warn_on_full_buffer=False)


def run_daemon(paths: Paths, config_path: str | Path, *, foreground: bool = True,
               factories: Factories | None = None, stop_timeout: float = STOP_TIMEOUT) -> int:
    """The body of `dbtunneld daemon`: returns the process exit code."""
    setup_daemon_logging(paths, foreground)
    daemon = Daemon(paths, config_path, factories, stop_timeout)
    install_signal_handlers(daemon)
    try:
        daemon.start()
    except ConfigError as exc:
        log.error("config is invalid, not starting:\n%s\nhint: %s", exc.message, exc.hint)
        return EXIT_CONFIG
    except AlreadyRunningError as exc:
        log.error("not starting: %s", exc.one_line())
        return EXIT_ALREADY_RUNNING
    except DbtunneldError as exc:
        log.error("not starting: %s", exc.one_line())
        return EXIT_FAIL
    daemon.serve_forever()
    signal.set_wakeup_fd(-1)
    finished = daemon.shutdown()
    logging.shutdown()
    if not finished:
        os._exit(EXIT_FAIL)        # a unit stuck past the bound must not keep the process alive
    return EXIT_OK
