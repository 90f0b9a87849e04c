"""What every login-item back-end shares: the status read back from the system, the result of a
change, the context a back-end runs in (platform, environment, tools, clock), which program the item
runs, and a login item kept in one file (read back, checked, told apart from a broken one).

The back-ends: ``autostart_launchd`` (macOS), ``autostart_xdg`` and ``autostart_systemd`` (Linux),
``autostart_windows``; ``autostart`` picks one per platform and mode.
"""

from __future__ import annotations

import ntpath
import os
import posixpath
import shlex
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Callable, Mapping, Protocol, Sequence

from ..core.errors import NeedsUserError
from ..core.paths import default_paths

MODES = ("tray", "daemon")
REWRITE = "run `dbtunneld autostart enable` to rewrite it"


class AutostartError(NeedsUserError):
    """The login item could not be written or registered; the hint says what to do."""


@dataclass(frozen=True)
class AutostartStatus:
    """What the system will start at login, read from the system itself.

    ``enabled`` is true only when the item is present, valid, registered and its program exists.
    ``loaded`` tells whether the login mechanism runs it right now (launchd job loaded, systemd unit
    active); None where the system cannot tell (XDG, Windows, no user manager).
    """

    enabled: bool
    mechanism: str | None = None  # "launchd" | "xdg" | "systemd" | "registry"
    mode: str | None = None  # "tray" | "daemon"
    location: str | None = None  # the file, or the registry key and value
    command: tuple[str, ...] = ()
    loaded: bool | None = None
    problems: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["command"], d["problems"] = list(self.command), list(self.problems)
        return d

    def describe(self) -> str:
        if self.location is None:
            head = "autostart: disabled (nothing starts at login)"
        else:
            state = "enabled" if self.enabled else "NOT enabled"
            head = f"autostart: {state} ({self.mode or '?'} mode, {self.mechanism})"
        lines = [head]
        if self.location:
            lines.append(f"  where: {self.location}")
        if self.command:
            lines.append(f"  runs:  {' '.join(_shell_word(a) for a in self.command)}")
        if self.loaded is not None:
            lines.append(f"  loaded now: {'yes' if self.loaded else 'no'}")
        lines += [f"  problem: {p}" for p in self.problems]
        return "\n".join(lines)


@dataclass(frozen=True)
class Change:
    """The result of enable() or disable(): what was done (one line each) and the status after."""

    status: AutostartStatus
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Ran:
    returncode: int
    stdout: str = ""
    stderr: str = ""




class LoginItem(Protocol):
    """One back-end: the login item of one mechanism (launchd, xdg, systemd, registry)."""

    mechanism: str

    def enable(self, mode: str, start_now: bool) -> list[str]: ...

    def disable(self, stop_now: bool) -> list[str]: ...

    def status(self) -> AutostartStatus | None: ...


Runner = Callable[[Sequence[str], Mapping[str, str]], Ran]


def run_tool(argv: Sequence[str], env: Mapping[str, str]) -> Ran:
    """Run launchctl / systemctl; a missing tool is exit code 127, never an exception."""
    try:
        p = subprocess.run(list(argv), env=dict(env), capture_output=True, text=True, timeout=30,
                           stdin=subprocess.DEVNULL)
    except FileNotFoundError:
        return Ran(127, "", f"{argv[0]}: not found")
    except subprocess.TimeoutExpired:
        return Ran(124, "", f"{argv[0]}: timed out after 30 s")
    return Ran(p.returncode, p.stdout, p.stderr)



# --- which program the login item runs -----------------------------------------------------------


def program_command(mode: str, platform: str, executable: str | None = None,
                    which: Callable[[str], str | None] = shutil.which) -> list[str]:
    """The command line that starts ``mode``, pointing at this installation.

    The ``dbtunneld`` script next to the running interpreter (the same venv or pipx install) comes
    first, then ``dbtunneld`` on PATH, then ``python -m dbtunneld``. On Windows ``pythonw.exe -m
    dbtunneld`` is preferred so no console window opens at login.
    """
    executable = executable or sys.executable
    windows_path = is_windows(platform) and "\\" in executable  # tests use "/" for Windows
    pm = ntpath if windows_path else posixpath
    here = pm.dirname(executable)
    if is_windows(platform):
        pythonw = pm.join(here, "pythonw.exe")
        if os.path.isfile(pythonw):
            return [pythonw, "-m", "dbtunneld", mode]
    name = "dbtunneld.exe" if is_windows(platform) else "dbtunneld"
    for candidate in (pm.join(here, name), pm.join(here, "Scripts", name)):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return [candidate, mode]
    found = which("dbtunneld")
    if found:
        return [found if is_windows(platform) else os.path.abspath(found), mode]
    return [executable, "-m", "dbtunneld", mode]


def is_windows(platform: str) -> bool:
    return platform.startswith("win")


def mode_of(command: Sequence[str]) -> str | None:
    return command[-1] if command and command[-1] in MODES else None


def program_missing(command: Sequence[str], where: str) -> list[str]:
    if command and not os.path.isfile(command[0]):
        return [f"{where} runs {command[0]}, which does not exist (moved or uninstalled?); "
                f"run `dbtunneld autostart enable` to point it at this install"]
    return []



# --- files and formats -----------------------------------------------------------------------------


def split_words(value: str, escape: Callable[[str, int, bool, int], int]) -> list[str]:
    """Split at blanks outside double quotes. ``escape(value, i, quoted, words_so_far)`` returns
    the length of an escape sequence at i (0 for none); its last character is taken literally."""
    words: list[str] = []
    cur: list[str] = []
    quoted = in_word = False
    i = 0
    while i < len(value):
        c, n = value[i], escape(value, i, quoted, len(words))
        if n:
            cur.append(value[i + n - 1])
            in_word = True
        elif c == '"':
            quoted, in_word = not quoted, True
        elif c in " \t" and not quoted:
            if in_word:
                words.append("".join(cur))
            cur, in_word = [], False
        else:
            cur.append(c)
            in_word = True
        i += n or 1
    return words + ["".join(cur)] if in_word else words


def _shell_word(arg: str) -> str:
    return shlex.quote(arg)


def template(name: str) -> Template:
    return Template(resources.files("dbtunneld").joinpath("templates", name).read_text("utf-8"))


def write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def remove_file(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


@dataclass
class LoginContext:
    platform: str
    env: dict[str, str]
    run: Runner
    command_for: Callable[[str], list[str]]
    uid: int
    winreg: Any = None
    clock: Callable[[], float] = time.monotonic
    sleep: Callable[[float], None] = time.sleep

    @property
    def home(self) -> Path:
        return Path(self.env.get("HOME") or Path.home())

    @property
    def config_home(self) -> Path:
        return Path(self.env.get("XDG_CONFIG_HOME") or self.home / ".config")

    def daemon_answers(self) -> bool:
        """True when a daemon already listens on the control socket (no protocol, just connect)."""
        path = default_paths(self.env, self.platform).socket_path
        if not hasattr(socket, "AF_UNIX") or not path.exists():
            return False
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(1.0)
            try:
                s.connect(str(path))
                return True
            except OSError:
                return False


class LoginFile:
    """A login item kept in one file: its status is the file, read back, plus what the
    system says of it (``_system_problems`` and ``_loaded`` are each mechanism's own)."""

    mechanism = ""
    path: Path

    def status(self) -> AutostartStatus | None:
        if not self.path.exists():
            return None
        problems: list[str] = []
        command = self._read(problems)
        problems += program_missing(command, str(self.path))
        problems += self._system_problems()
        return AutostartStatus(not problems, self.mechanism, mode_of(command), str(self.path),
                               tuple(command), self._loaded(), tuple(problems))

    def _read(self, problems: list[str]) -> list[str]:
        raise NotImplementedError

    def _system_problems(self) -> list[str]:
        return []

    def _loaded(self) -> bool | None:
        return None
