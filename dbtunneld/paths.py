"""Platform paths: config file, state directory, log directory, runtime (socket) directory.
Also the one platform fact several owners of state files need: whether a recorded pid still runs.

Every path honours DBTUNNELD_HOME (tests and the sandbox point it at a private folder) and
the XDG variables on Linux; macOS and Windows use their usual per-user folders.
"""

from __future__ import annotations

import os
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

    def ensure(self) -> "Paths":
        """Create the folders with private modes (0700)."""
        for d in (self.config_file.parent, self.state_dir, self.log_dir, self.runtime_dir):
            d.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.runtime_dir, 0o700)
        os.chmod(self.state_dir, 0o700)
        return self


def default_paths(env: dict[str, str] | None = None, platform: str | None = None) -> Paths:
    env = dict(os.environ if env is None else env)
    platform = platform or sys.platform
    home = Path(env.get("HOME") or Path.home())
    root = env.get("DBTUNNELD_HOME")
    if root:
        r = Path(root)
        return Paths(r / "config.toml", r / "state", r / "log", r / "run")
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


def pid_alive(pid: int) -> bool:
    """True when a process with this pid exists (one we may not signal counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True
