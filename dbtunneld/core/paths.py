"""Platform paths: config file, state directory, log directory, runtime (socket) directory.
Also the one platform fact several owners of state files need: whether a recorded pid is still
the process that recorded it (a zombie, or a pid the OS gave to another program, is not).

Every path honours DBTUNNELD_HOME (tests and the sandbox point it at a private folder) and
the XDG variables on Linux; macOS and Windows use their usual per-user folders. For this process
the base folders come from platformdirs (Windows' known folders, XDG on Linux); for another
process's environment or platform (``env`` / ``platform`` given) they are derived from it the
same way, so the sandbox and autostart can compute another user's paths.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

APP = "dbtunneld"


@dataclass(frozen=True)
class Paths:
    config_file: Path
    state_dir: Path
    log_dir: Path
    runtime_dir: Path

    @property
    def socket_path(self) -> Path:
        return self.runtime_dir / "control.sock"

    @property
    def lock_path(self) -> Path:
        return self.runtime_dir / "daemon.lock"

    @property
    def log_file(self) -> Path:
        return self.log_dir / "dbtunneld.log"

    @property
    def ports_file(self) -> Path:
        return self.state_dir / "ports.json"

    @property
    def leases_file(self) -> Path:
        return self.state_dir / "leases.json"

    @property
    def wanted_file(self) -> Path:
        return self.state_dir / "wanted.json"

    def ensure(self) -> "Paths":
        """Create the folders with private modes (0700)."""
        for d in (self.config_file.parent, self.state_dir, self.log_dir, self.runtime_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.runtime_dir, 0o700)
        os.chmod(self.state_dir, 0o700)
        return self


def default_paths(env: dict[str, str] | None = None, platform: str | None = None) -> Paths:
    this_process = env is None and platform is None
    env = dict(os.environ if env is None else env)
    platform = platform or sys.platform
    home = Path(env.get("HOME") or Path.home())
    root = env.get("DBTUNNELD_HOME")
    if root:
        r = Path(root)
        return Paths(r / "config.toml", r / "state", r / "log", r / "run")
    if this_process:
        return _platformdirs_paths(env)
    if platform == "darwin":
        lib = home / "Library"
        return Paths(
            lib / "Application Support" / APP / "config.toml",
            lib / "Application Support" / APP / "state",
            lib / "Logs" / APP,
            lib / "Application Support" / APP / "run",
        )
    if platform.startswith("win"):
        appdata = Path(env.get("APPDATA") or home / "AppData" / "Roaming")
        local = Path(env.get("LOCALAPPDATA") or home / "AppData" / "Local")
        return Paths(appdata / APP / "config.toml", local / APP / "state",
                     local / APP / "logs", local / APP / "run")
    config_home = Path(env.get("XDG_CONFIG_HOME") or home / ".config")
    state_home = Path(env.get("XDG_STATE_HOME") or home / ".local" / "state")
    runtime = env.get("XDG_RUNTIME_DIR")
    run_dir = Path(runtime) / APP if runtime else state_home / APP / "run"
    return Paths(config_home / APP / "config.toml", state_home / APP,
                 state_home / APP / "log", run_dir)


def _platformdirs_paths(env: dict[str, str]) -> Paths:
    """This process's per-user folders from platformdirs (the same layout as below)."""
    import platformdirs

    dirs = platformdirs.PlatformDirs(APP, appauthor=False, roaming=True)
    config = Path(dirs.user_config_dir)
    if sys.platform == "darwin":
        return Paths(config / "config.toml", config / "state", Path(dirs.user_log_dir), config / "run")
    if sys.platform.startswith("win"):
        local = Path(platformdirs.user_data_dir(APP, appauthor=False, roaming=False))
        return Paths(config / "config.toml", local / "state", local / "logs", local / "run")
    state = Path(dirs.user_state_dir)
    runtime = env.get("XDG_RUNTIME_DIR")      # platformdirs falls back to /tmp/runtime-UID: keep ours
    return Paths(config / "config.toml", state, state / "log", Path(runtime) / APP if runtime else state / "run")


def short_socket_hint(platform: str | None = None) -> str:
    """The fix for a control-socket path longer than the OS allows (104 bytes on macOS, 108 on Linux)."""
    platform = platform or sys.platform
    if platform == "darwin":                     # macOS has no XDG_RUNTIME_DIR: only DBTUNNELD_HOME moves it
        return ("set DBTUNNELD_HOME to a short folder, e.g. `export DBTUNNELD_HOME=~/.dbtunneld` in your "
                "shell profile (config, state and logs then live there too), then run "
                "`dbtunneld autostart enable` again so that the login item uses it")
    if platform.startswith("win"):
        return "set DBTUNNELD_HOME to a short folder, e.g. C:\\dbtunneld"
    return "set XDG_RUNTIME_DIR or DBTUNNELD_HOME to a shorter folder"


@dataclass(frozen=True)
class ProcessIdentity:
    """What tells a process apart from a later one that got the same pid."""

    started: str        # Linux: boot id + start time in clock ticks; macOS/BSD: ps's lstart
    command: str        # the command line, arguments joined by spaces


def process_identity(pid: int) -> ProcessIdentity | None:
    """The identity of a running process; None when there is none with this pid, or it is a
    zombie (dead, not yet reaped by its parent: it holds no lock, socket or lease any more)."""
    if pid <= 0:
        return None
    if os.path.isdir("/proc/self"):
        return _linux_identity(pid)
    if os.name == "posix":
        return _ps_identity(pid)
    return ProcessIdentity("", "") if _signal_zero(pid) else None


def _linux_identity(pid: int) -> ProcessIdentity | None:
    try:
        stat = open(f"/proc/{pid}/stat", "rb").read().decode(errors="replace")
        command = open(f"/proc/{pid}/cmdline", "rb").read()
    except (FileNotFoundError, ProcessLookupError):
        return None
    except PermissionError:                       # hidepid: it runs, but is not ours to read
        return ProcessIdentity("", "")
    fields = stat[stat.rindex(")") + 2:].split()  # the name in (...) may hold spaces
    if fields[0] in ("Z", "X"):
        return None
    return ProcessIdentity(f"{_boot_id()}:{fields[19]}", command.rstrip(b"\0").replace(b"\0", b" ").decode(errors="replace"))


def _boot_id() -> str:
    try:
        return open("/proc/sys/kernel/random/boot_id").read().strip()
    except OSError:
        return ""


def _ps_identity(pid: int, run=subprocess.run) -> ProcessIdentity | None:
    """macOS / BSD: ``ps -o stat=,lstart=,command= -p PID`` (no /proc there)."""
    try:
        out = run(["ps", "-o", "stat=,lstart=,command=", "-p", str(pid)], capture_output=True, text=True,
                  timeout=5, env={**os.environ, "LC_ALL": "C"}).stdout
    except (OSError, subprocess.SubprocessError):
        return ProcessIdentity("", "") if _signal_zero(pid) else None
    return parse_ps_line(out)


def parse_ps_line(line: str) -> ProcessIdentity | None:
    """``Ss   Fri Dec  4 15:41:38 2026     /usr/bin/python3 -m dbtunneld.ui.cli daemon`` -> identity;
    None for no line or a zombie (stat starting with Z). lstart is 24 characters wide."""
    line = line.strip("\n")
    if not line.strip():
        return None
    state, _, rest = line.strip().partition(" ")
    if state.startswith("Z"):
        return None
    rest = rest.lstrip()
    return ProcessIdentity(" ".join(rest[:24].split()), rest[24:].strip())


def _signal_zero(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def pid_alive(pid: int, identity: ProcessIdentity | None = None) -> bool:
    """True when ``pid`` runs (not a zombie) and, given the ``identity`` recorded with it, is still
    that process. An unreadable identity (another user's process) counts as alive."""
    now = process_identity(pid)
    if now is None:
        return False
    if identity is None or not now.started or not identity.started:
        return True
    return now == identity


def my_identity() -> ProcessIdentity:
    """This process's identity, to record next to ``os.getpid()``."""
    return process_identity(os.getpid()) or ProcessIdentity("", "")
