"""The ``ssh`` transport on OpenSSH (``[bastion] client = "openssh"``): one ``ssh -M`` ControlMaster
per bastion login, shared by every tunnel through it, moves the bytes in C.

The daemon starts the master with the settings its paramiko path uses (host key checked against
the pinned key or known_hosts, never accepted blindly; the key file and/or the ssh-agent;
``ServerAliveInterval`` = ``tunnels.keepalive_interval``, giving up after about
``tunnels.health_timeout`` more; BatchMode; no user ssh_config; nothing secret in argv), then
hands each accepted client socket to it (``openssh_mux``). The EC2 Instance Connect key is an
in-memory key and stays on paramiko. A master that exits means the upstream is lost: the tunnel
reconnects as with paramiko. ``MasterPool`` shares one master per (host, port, user, key, host
key source, keepalive) and stops it by pid when its last tunnel lets go.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..core.errors import (ClosedError, DbtunneldError, HostKeyError, NeedsUserError, PermissionDeniedError,
                           ProtocolError, TransientError)
from . import openssh_leftovers, openssh_mux, upstream_end
from .transport import Transport

log = logging.getLogger(__name__)

CONTROL_PATH_MAX = 103            # sun_path is 104-108 bytes with its NUL (104 on macOS)
CONTROL_PATH_EXTRA = 15 + 17      # "/ssh-XXXXXXXX/c", then ssh's temporary ".XXXXXXXXXXXXXXXX" while it binds
STOP_WAIT = 3.0


def find_ssh() -> str:
    """OpenSSH's ``ssh`` with connection sharing, or an error naming the setting and the fix."""
    if sys.platform.startswith("win"):
        raise NeedsUserError('bastion.client = "openssh": OpenSSH for Windows has no connection sharing (ControlMaster)',
                             hint='set bastion.client = "paramiko"')
    found = shutil.which("ssh")
    if not found:
        raise NeedsUserError('bastion.client = "openssh" needs OpenSSH\'s ssh on PATH (not found)',
                             hint='install the OpenSSH client, or set bastion.client = "paramiko"')
    return found


@dataclass(frozen=True)
class MasterSettings:
    """Everything that makes two tunnels' masters interchangeable (the pool's key)."""

    host: str
    port: int
    user: str
    key_file: str = ""
    host_key: str = ""               # pinned "ssh-ed25519 AAAA..."; else known_hosts
    known_hosts: str = ""            # default ~/.ssh/known_hosts
    keepalive_interval: float = 5.0
    health_timeout: float = 5.0
    connect_timeout: float = 15.0

    @property
    def label(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    @property
    def alive_count_max(self) -> int:
        """ssh gives up after (count + 1) silent intervals: about keepalive_interval + health_timeout."""
        return max(1, math.ceil(self.health_timeout / self.keepalive_interval))


def master_settings(bastion: Any, tunnels: Any) -> MasterSettings:
    """From ``[bastion]`` and ``[tunnels]`` (config.BastionConfig, config.TunnelSettings)."""
    return MasterSettings(host=bastion.host, port=bastion.port, user=bastion.user, key_file=bastion.key_file,
                          host_key=bastion.host_key, known_hosts=bastion.known_hosts,
                          keepalive_interval=tunnels.keepalive_interval, health_timeout=tunnels.health_timeout)


def master_argv(ssh: str, s: MasterSettings, control_path: str, known_hosts: str) -> list[str]:
    key = _path_option(os.path.expanduser(s.key_file)) if s.key_file else "none"
    options = {
        "ControlMaster": "yes", "ControlPath": _path_option(control_path), "ControlPersist": "no",
        "IdentityFile": key, "BatchMode": "yes", "StrictHostKeyChecking": "yes",
        "UserKnownHostsFile": _path_option(known_hosts),
        "GlobalKnownHostsFile": "/dev/null", "UpdateHostKeys": "no", "CheckHostIP": "no",
        "ServerAliveInterval": str(max(1, round(s.keepalive_interval))),
        "ServerAliveCountMax": str(s.alive_count_max), "ConnectTimeout": str(max(1, round(s.connect_timeout))),
        "ExitOnForwardFailure": "yes", "Ciphers": "^aes128-gcm@openssh.com,aes256-gcm@openssh.com",
        "LogLevel": "ERROR", "PasswordAuthentication": "no", "KbdInteractiveAuthentication": "no",
    }
    argv = [ssh, "-F", "/dev/null", "-M", "-N", "-T", "-p", str(s.port), "-l", s.user]
    for name, value in options.items():
        argv += ["-o", f"{name}={value}"]
    return argv + ["--", s.host]


def _path_option(path: str) -> str:
    """A path as an ssh -o value: "%" would start a token (ssh_config TOKENS), a space would
    split UserKnownHostsFile into two files; quoted, it is one path."""
    return '"' + path.replace("%", "%%") + '"'


def classify_exit(text: str, s: MasterSettings) -> DbtunneldError:
    """What ssh's stderr says, as a dbtunneld error with the fix (one place for all of it)."""
    source = "bastion.host_key" if s.host_key else os.path.expanduser(s.known_hosts or "~/.ssh/known_hosts")
    seen = _fingerprint(text)
    if "IDENTIFICATION HAS CHANGED" in text or "has changed and you have requested strict" in text:
        return HostKeyError(f"host key of {s.label} does not match {source}: the server sent {seen}",
                            hint=("someone may be intercepting the connection, or the bastion was rebuilt; "
                                  "verify the new key with your admin, then update " + source))
    if "host key is known" in text or "Host key verification failed" in text:
        return HostKeyError(f"host key of {s.label} is not known; it is never accepted blindly",
                            hint=f"verify the fingerprint with your admin, then pin it in bastion.host_key "
                                 f"(or add it to {source})")
    if "UNPROTECTED PRIVATE KEY" in text or "bad permissions" in text:
        return NeedsUserError(f"ssh refuses the key {s.key_file}: its permissions are too open",
                              hint=f"chmod 600 {s.key_file}")
    if "Permission denied" in text:
        return PermissionDeniedError(f"the bastion {s.label} refused user {s.user!r} ({_last_line(text)})",
                                     hint="check bastion.user and bastion.key_file, or load your key with `ssh-add`")
    return TransientError(f"ssh to the bastion {s.label} ended: {_last_line(text) or 'no message'}",
                          hint="the bastion may be restarting; dbtunneld retries")


def _fingerprint(text: str) -> str:
    found = re.search(r"SHA256:[A-Za-z0-9+/=]+", text)
    return found.group(0) if found else "another key"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("@@@")]
    return lines[-1] if lines else ""


class OpenSshMaster:
    """One ``ssh -M -N`` process and its control socket, in a private folder of its own."""

    def __init__(self, settings: MasterSettings, runtime_dir: Path) -> None:
        self.settings = settings
        self._runtime_dir = runtime_dir
        self._record: Path | None = None
        self.dir = _private_dir(runtime_dir)
        self.control_path = str(self.dir / "c")
        self.exited = threading.Event()
        self._on_exit: list[Any] = []
        self._proc: subprocess.Popen[bytes] | None = None
        self._watcher: openssh_mux.EndWatcher | None = None
        self._lock = threading.Lock()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> None:
        s = self.settings
        argv = master_argv(find_ssh(), s, self.control_path, self._known_hosts())
        with open(self.dir / "ssh.log", "wb") as err:
            self._proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                          start_new_session=True, close_fds=True)
        log.info("ssh master for %s@%s started (pid %d)", s.user, s.label, self._proc.pid)
        self._record = openssh_leftovers.record_master(self._runtime_dir, self._proc.pid, self.dir)
        try:
            self._wait_ready(time.monotonic() + s.connect_timeout + s.health_timeout)
        except BaseException:
            self.stop()
            raise
        self._watcher = openssh_mux.EndWatcher(f"ssh-master-{self._proc.pid}-ends")
        threading.Thread(target=self._reap, name=f"ssh-master-{self._proc.pid}", daemon=True).start()

    def _known_hosts(self) -> str:
        s = self.settings
        if not s.host_key:
            return os.path.expanduser(s.known_hosts or "~/.ssh/known_hosts")
        path = self.dir / "known_hosts"
        path.write_text(f"{s.label} {' '.join(s.host_key.split()[:2])}\n")
        return str(path)

    def _wait_ready(self, deadline: float) -> None:
        """Ready once the control socket answers an alive check (ssh creates it after login)."""
        assert self._proc is not None
        while True:
            if self._proc.poll() is not None:
                raise classify_exit(self.stderr(), self.settings)
            if os.path.exists(self.control_path):
                try:
                    openssh_mux.alive_check(self.control_path, 2.0)
                    return
                except TransientError:
                    pass
            if time.monotonic() > deadline:
                raise TransientError(f"ssh to the bastion {self.settings.label} did not log in within "
                                     f"{self.settings.connect_timeout:g} s", hint="dbtunneld retries")
            time.sleep(0.02)

    def _reap(self) -> None:
        assert self._proc is not None
        code = self._proc.wait()
        if not self.exited.is_set():
            log.warning("ssh master for %s exited (%s): %s", self.settings.label, code,
                        _last_line(self.stderr()) or "no message")
        self._exit()

    def on_exit(self, callback: Any) -> None:
        """Call ``callback()`` when the process exits (at once if it has)."""
        with self._lock:
            if not self.exited.is_set():
                self._on_exit.append(callback)
                return
        callback()

    def forget(self, callback: Any) -> None:
        with self._lock:
            if callback in self._on_exit:
                self._on_exit.remove(callback)

    def _exit(self) -> None:
        with self._lock:
            self.exited.set()
            callbacks, self._on_exit = self._on_exit, []
        if self._watcher is not None:
            self._watcher.close()
        for callback in callbacks:
            callback()

    def stderr(self) -> str:
        try:
            return (self.dir / "ssh.log").read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def why_exited(self) -> str:
        if not self.exited.is_set():
            return ""
        text = self.stderr()
        if not text.strip() and self._proc is not None and self._proc.returncode is not None:
            code = self._proc.returncode
            return f"the ssh master for {self.settings.label} " + (
                f"was killed (signal {-code})" if code < 0 else f"exited with status {code}")
        return classify_exit(text, self.settings).message

    def is_alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None and not self.exited.is_set()

    def ping(self, timeout: float) -> bool:
        if not self.is_alive():
            return False
        try:
            return openssh_mux.alive_check(self.control_path, timeout) == self.pid
        except (TransientError, ClosedError, ProtocolError):
            return False

    def forward(self, client: socket.socket, host: str, port: int, timeout: float, label: str) -> openssh_mux.MuxForward:
        self._check_alive()
        return self._watched(openssh_mux.forward_client(self.control_path, client, host, port, timeout, label))

    async def forward_async(self, client: socket.socket, host: str, port: int, timeout: float,
                            label: str) -> openssh_mux.MuxForward:
        """``forward`` on the running asyncio loop (the engine's): no thread waits meanwhile."""
        self._check_alive()
        fwd = await openssh_mux.forward_client_async(self.control_path, client, host, port, timeout, label)
        return self._watched(fwd)

    def _check_alive(self) -> None:
        if not self.is_alive() or self._watcher is None:
            raise TransientError(f"the ssh master for {self.settings.label} is gone")

    def _watched(self, fwd: openssh_mux.MuxForward) -> openssh_mux.MuxForward:
        watcher = self._watcher
        assert watcher is not None
        try:
            watcher.watch(fwd)
        except BaseException:
            fwd.close()                  # never a forward nobody watches or holds
            raise
        return fwd

    def stop(self) -> None:
        """End every forward and the process (SIGTERM by pid, then SIGKILL); remove its folder."""
        self._exit()
        proc = self._proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_WAIT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_WAIT)
            log.info("ssh master for %s stopped (pid %d)", self.settings.label, proc.pid)
        shutil.rmtree(self.dir, ignore_errors=True)
        openssh_leftovers.forget_master(self._record)


def _channel_refused(s: MasterSettings, exc: openssh_mux.MuxRefusedError) -> DbtunneldError:
    from .ssh import ChannelOpenError
    return ChannelOpenError(f"the bastion {s.label} could not open a channel: {exc.message}", hint=exc.hint)


def _private_dir(runtime_dir: Path) -> Path:
    """A 0700 folder for one master; under the runtime dir unless its socket path would be too long."""
    base = runtime_dir
    if len(os.fsencode(str(base))) + CONTROL_PATH_EXTRA > CONTROL_PATH_MAX:
        base = Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True, mode=0o700)
    return Path(tempfile.mkdtemp(prefix="ssh-", dir=base))


class MasterPool:
    """Masters shared by key, reference-counted: ``acquire`` starts one when none is alive."""

    def __init__(self, runtime_dir: Path | None = None) -> None:
        self._runtime_dir = runtime_dir
        self._lock = threading.Lock()
        self._starting: dict[MasterSettings, threading.Lock] = {}
        self._current: dict[MasterSettings, OpenSshMaster] = {}
        self._refs: dict[int, int] = {}

    def use_runtime_dir(self, runtime_dir: Path) -> None:
        """Where masters (and their records, ``openssh_leftovers``) go from now on: the daemon's."""
        with self._lock:
            self._runtime_dir = runtime_dir

    def runtime_dir(self) -> Path:
        if self._runtime_dir is None:
            from ..core.paths import default_paths
            self._runtime_dir = default_paths().runtime_dir
        return self._runtime_dir

    def acquire(self, settings: MasterSettings) -> OpenSshMaster:
        with self._lock:
            starting = self._starting.setdefault(settings, threading.Lock())
        with starting:                        # one login per key at a time; other keys go on
            with self._lock:
                master = self._current.get(settings)
                if master is not None and master.is_alive():
                    self._refs[id(master)] += 1
                    return master
            master = OpenSshMaster(settings, self.runtime_dir())
            master.start()
            with self._lock:
                self._current[settings] = master
                self._refs[id(master)] = 1
            return master

    def release(self, master: OpenSshMaster) -> None:
        with self._lock:
            left = self._refs.get(id(master), 0) - 1
            if left > 0:
                self._refs[id(master)] = left
                return
            self._refs.pop(id(master), None)
            if self._current.get(master.settings) is master:
                del self._current[master.settings]
        master.stop()

    def masters(self) -> list[OpenSshMaster]:
        with self._lock:
            return list(self._current.values())


MASTERS = MasterPool()


class OpenSshTransport(Transport):
    """``ssh`` through a shared OpenSSH master: ``adopt`` hands a client socket over (on the
    engine's asyncio loop; ``adopt_blocking`` elsewhere);
    ``open_channel`` (probes, relays that must see the bytes) gives one end of a socketpair."""

    kind = "ssh"
    adopts_clients = True
    ssh_client = "openssh"

    def __init__(self, settings: MasterSettings, pool: MasterPool = MASTERS) -> None:
        self.settings = settings
        self._pool = pool
        self._master: OpenSshMaster | None = None
        self._gone = threading.Event()
        self._gone.set()
        self._end = upstream_end.ended()     # told when the master exits, or on close (on_closed)
        self._forwards: set[openssh_mux.MuxForward] = set()
        self._lock = threading.Lock()

    def connect(self) -> None:
        self.close()
        master = self._pool.acquire(self.settings)
        gone, end = threading.Event(), upstream_end.UpstreamEnd()
        with self._lock:
            self._master, self._gone, self._end = master, gone, end
        master.on_exit(gone.set)
        master.on_exit(end.end)

    def _current(self) -> OpenSshMaster:
        master = self._master
        if master is None:
            raise TransientError("ssh: not connected")
        return master

    async def adopt(self, client: socket.socket, host: str, port: int, timeout: float,
                    label: str = "") -> openssh_mux.MuxForward:
        """Hand ``client`` to the master on the running asyncio loop (the caller closes its copy);
        a handle with close()/done."""
        try:
            fwd = await self._current().forward_async(client, host, port, timeout, label or f"{host}:{port}")
        except openssh_mux.MuxRefusedError as exc:
            raise _channel_refused(self.settings, exc) from None
        return self._track(fwd)

    def adopt_blocking(self, client: socket.socket, host: str, port: int, timeout: float,
                       label: str = "") -> openssh_mux.MuxForward:
        """``adopt`` for callers off any loop (``open_channel``): blocks the calling thread."""
        try:
            fwd = self._current().forward(client, host, port, timeout, label or f"{host}:{port}")
        except openssh_mux.MuxRefusedError as exc:
            raise _channel_refused(self.settings, exc) from None
        return self._track(fwd)

    def _track(self, fwd: openssh_mux.MuxForward) -> openssh_mux.MuxForward:
        with self._lock:
            self._forwards.add(fwd)
        fwd.on_end(self._forgotten)
        return fwd

    def _forgotten(self, fwd: openssh_mux.MuxForward) -> None:
        with self._lock:
            self._forwards.discard(fwd)

    def open_channel(self, host: str, port: int, timeout: float) -> Any:
        ours, theirs = socket.socketpair()
        try:
            self.adopt_blocking(theirs, host, port, timeout)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return ours

    def is_alive(self) -> bool:
        master = self._master
        return master is not None and master.is_alive() and not self._gone.is_set()

    def ping(self, timeout: float) -> bool:
        master = self._master
        return master is not None and master.ping(timeout)

    def ping_interval(self, keepalive_interval: float) -> float:
        """The master sends the keepalives itself (ServerAliveInterval) and exits when they go
        unanswered: no periodic ping from the tunnel (``ping`` stays for checks on demand)."""
        return math.inf

    def on_closed(self, callback: Any) -> None:
        self._end.add(callback)

    def wait_closed(self, timeout: float | None = None) -> bool:
        return self._gone.wait(timeout)

    def why_closed(self) -> str:
        master = self._master
        return master.why_exited() if master is not None else ""

    def close(self) -> None:
        with self._lock:
            master, self._master = self._master, None
            forwards, self._forwards = list(self._forwards), set()
            gone, end = self._gone, self._end
        gone.set()
        end.end()
        for fwd in forwards:
            fwd.close()
        if master is not None:
            master.forget(gone.set)
            master.forget(end.end)
            self._pool.release(master)

    def describe(self) -> str:
        return f"ssh (openssh) via {self.settings.label}"
