"""Start at login: one login item per user, written from the templates in ``dbtunneld/templates``.

macOS: a LaunchAgent plist (launchd restarts it after a crash, not after a clean quit). Linux: an
XDG autostart entry for the tray on a desktop, or a systemd user unit for the headless daemon, never
both (systemd turns XDG entries into units: one program would start twice). Windows: a value under
HKCU\\...\\CurrentVersion\\Run. ``status()`` reads the truth from the system every time; nothing is
remembered. Front-end layer: the CLI and the tray's "Start at login" checkbox use this module.
"""

from __future__ import annotations

import logging
import ntpath
import os
import plistlib
import posixpath
import shlex
import shutil
import socket
import subprocess
import sys
import time
from configparser import ConfigParser, Error as ConfigParserError
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any, Callable, Mapping, Sequence
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape as xml_escape

from .errors import NeedsUserError
from .paths import default_paths

log = logging.getLogger(__name__)

MODES = ("tray", "daemon")
LAUNCHD_LABEL = "io.github.dbtunneld"
UNIT_NAME = "dbtunneld.service"
DESKTOP_NAME = "dbtunneld.desktop"
RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
APPROVED_KEY = r"Software\Microsoft\Windows\CurrentVersion\Explorer\StartupApproved\Run"
RUN_VALUE = "dbtunneld"
FALLBACK_ICON = "network-server"
REWRITE = "run `dbtunneld autostart enable` to rewrite it"
# launchd keeps a booted-out label until its process has exited (SIGKILL after ExitTimeOut, 20 s by
# default); until then `bootstrap` fails with 5 (EIO) or 37 (EALREADY, operation in progress).
LAUNCHD_FREE_WAIT = 25.0
LAUNCHD_POLL = 0.5
BOOTSTRAP_BUSY = (5, 37)
# launchd starts agents with PATH=/usr/bin:/bin:/usr/sbin:/sbin: add Homebrew's folders (Apple
# silicon, Intel) so that a Homebrew session-manager-plugin or ssh is found.
LAUNCHD_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")


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
    windows_path = _is_windows(platform) and "\\" in executable  # tests use "/" for Windows
    pm = ntpath if windows_path else posixpath
    here = pm.dirname(executable)
    if _is_windows(platform):
        pythonw = pm.join(here, "pythonw.exe")
        if os.path.isfile(pythonw):
            return [pythonw, "-m", "dbtunneld", mode]
    name = "dbtunneld.exe" if _is_windows(platform) else "dbtunneld"
    for candidate in (pm.join(here, name), pm.join(here, "Scripts", name)):
        if os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return [candidate, mode]
    found = which("dbtunneld")
    if found:
        return [found if _is_windows(platform) else os.path.abspath(found), mode]
    return [executable, "-m", "dbtunneld", mode]


def _is_windows(platform: str) -> bool:
    return platform.startswith("win")


def _mode_of(command: Sequence[str]) -> str | None:
    return command[-1] if command and command[-1] in MODES else None


def _program_missing(command: Sequence[str], where: str) -> list[str]:
    if command and not os.path.isfile(command[0]):
        return [f"{where} runs {command[0]}, which does not exist (moved or uninstalled?); "
                f"run `dbtunneld autostart enable` to point it at this install"]
    return []


# --- quoting for each file format ----------------------------------------------------------------

_DESKTOP_RESERVED = set(' \t\n"\'\\><~|&;$*?#()`')


def desktop_exec_quote(argv: Sequence[str]) -> str:
    """An Exec= value (XDG Desktop Entry spec): quote reserved characters, double ``%``, escape
    backslashes once for the quoting rule and once more for the string value type."""
    words = []
    for arg in argv:
        arg = arg.replace("%", "%%")
        if arg and not (set(arg) & _DESKTOP_RESERVED):
            words.append(arg)
            continue
        inner = "".join("\\" + c if c in '"`$\\' else c for c in arg)
        words.append('"' + inner + '"')
    return " ".join(words).replace("\\", "\\\\")


def desktop_exec_split(value: str) -> list[str]:
    """Inverse of desktop_exec_quote (for the subset of the spec that quote produces)."""
    def escape(v: str, i: int, quoted: bool, nwords: int) -> int:
        return 2 if quoted and v[i] == "\\" and i + 1 < len(v) else 0
    words = _split_words(_unescape_desktop_string(value), escape)
    return [w.replace("%%", "%") for w in words]


def _split_words(value: str, escape: Callable[[str, int, bool, int], int]) -> list[str]:
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


def _unescape_desktop_string(value: str) -> str:
    table = {"s": " ", "n": "\n", "t": "\t", "r": "\r", "\\": "\\"}
    out, i = [], 0
    while i < len(value):
        if value[i] == "\\" and i + 1 < len(value) and value[i + 1] in table:
            out.append(table[value[i + 1]])
            i += 2
        else:
            out.append(value[i])
            i += 1
    return "".join(out)


def systemd_quote(argv: Sequence[str]) -> str:
    """An ExecStart= value: every word double-quoted with C-style escapes and ``%`` doubled; ``$``
    doubled in the arguments (systemd expands variables there, not in the program path)."""
    def one(arg: str, is_program: bool) -> str:
        arg = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
        return '"' + (arg if is_program else arg.replace("$", "$$")) + '"'
    return " ".join(one(a, i == 0) for i, a in enumerate(argv))


def systemd_split(value: str) -> list[str]:
    """Inverse of systemd_quote, also accepting unquoted words."""
    def escape(v: str, i: int, quoted: bool, nwords: int) -> int:
        doubled = v[i] == "%" or (v[i] == "$" and nwords > 0)  # `$$` only after the program
        if (v[i] == "\\" and i + 1 < len(v)) or (doubled and v[i + 1:i + 2] == v[i]):
            return 2
        return 0
    return _split_words(value, escape)


def windows_command_line(argv: Sequence[str]) -> str:
    """A Run value: the program always quoted (an unquoted path with spaces is a known hijack)."""
    rest = subprocess.list2cmdline(list(argv[1:]))
    return f'"{argv[0]}"' + (f" {rest}" if rest else "")


def windows_split(value: str) -> list[str]:
    """Split a command line of the form windows_command_line writes (quotes, no escapes)."""
    return _split_words(value, lambda v, i, quoted, nwords: 0)


def _shell_word(arg: str) -> str:
    return shlex.quote(arg)


# --- rendering ---------------------------------------------------------------------------------


def _template(name: str) -> Template:
    return Template(resources.files("dbtunneld").joinpath("templates", name).read_text("utf-8"))


def render_plist(command: Sequence[str], mode: str, log_dir: Path, label: str = LAUNCHD_LABEL,
                 env: Mapping[str, str] | None = None) -> str:
    """``env``: the caller's environment; a DBTUNNELD_HOME set there is kept for the login item."""
    args = "\n".join(f"\t\t<string>{xml_escape(a)}</string>" for a in command)
    variables = {"PATH": launchd_path(command)}
    if env and env.get("DBTUNNELD_HOME"):
        variables["DBTUNNELD_HOME"] = env["DBTUNNELD_HOME"]
    environment = "\n".join(f"\t\t<key>{k}</key>\n\t\t<string>{xml_escape(v)}</string>" for k, v in variables.items())
    return _template("launchd.plist").substitute(
        label=xml_escape(label), program_arguments=args, environment=environment,
        # Background would throttle the daemon's I/O and CPU (tunnels); Standard = no throttling
        process_type="Interactive" if mode == "tray" else "Standard",
        stdout_path=xml_escape(str(log_dir / f"launchd-{mode}.out.log")),
        stderr_path=xml_escape(str(log_dir / f"launchd-{mode}.err.log")),
    )


def launchd_path(command: Sequence[str]) -> str:
    """PATH for the LaunchAgent: the program's own folder first, then Homebrew's and the system's."""
    folders = [posixpath.dirname(command[0])] if command and posixpath.isabs(command[0]) else []
    return ":".join(dict.fromkeys(folders + list(LAUNCHD_PATH)))


def render_desktop(command: Sequence[str], icon: str) -> str:
    icon = icon.replace("\\", "\\\\")
    return _template("autostart.desktop").substitute(exec=desktop_exec_quote(command), icon=icon)


def render_unit(command: Sequence[str]) -> str:
    return _template("dbtunneld.service").substitute(exec_start=systemd_quote(command))


def icon_path() -> str:
    """The largest installed "ok" PNG for the desktop entry, or a themed icon name if none ships."""
    folder = resources.files("dbtunneld").joinpath("icons")
    try:
        names = [p.name for p in folder.iterdir() if p.name.endswith(".png")]
    except (FileNotFoundError, NotADirectoryError):
        names = []
    for prefix in ("dbtunneld", "app", "ok-", "idle-", ""):
        matches = [n for n in names if n.startswith(prefix) and not n.startswith("template")]
        if matches:
            return str(folder.joinpath(max(matches, key=_icon_size)))
    return FALLBACK_ICON


def _icon_size(name: str) -> tuple[int, str]:
    digits = "".join(c for c in name.rsplit("-", 1)[-1] if c.isdigit())
    return (int(digits) if digits else 0, name)


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


def _remove(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


# --- per-platform back-ends ----------------------------------------------------------------------


@dataclass
class _Context:
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


class _LoginFile:
    """A login item kept in one file: its status is the file, read back, plus what the
    system says of it (``_system_problems`` and ``_loaded`` are each mechanism's own)."""

    mechanism = ""
    path: Path

    def status(self) -> AutostartStatus | None:
        if not self.path.exists():
            return None
        problems: list[str] = []
        command = self._read(problems)
        problems += _program_missing(command, str(self.path))
        problems += self._system_problems()
        return AutostartStatus(not problems, self.mechanism, _mode_of(command), str(self.path),
                               tuple(command), self._loaded(), tuple(problems))

    def _read(self, problems: list[str]) -> list[str]:
        raise NotImplementedError

    def _system_problems(self) -> list[str]:
        return []

    def _loaded(self) -> bool | None:
        return None


class LaunchdAgent(_LoginFile):
    """macOS: ~/Library/LaunchAgents/<label>.plist, loaded into the gui/UID domain."""

    mechanism = "launchd"

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.path = ctx.home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        self.domain = f"gui/{ctx.uid}"
        self.target = f"{self.domain}/{LAUNCHD_LABEL}"

    def _launchctl(self, *args: str) -> Ran:
        return self.ctx.run(["launchctl", *args], self.ctx.env)

    def enable(self, mode: str, start_now: bool) -> list[str]:
        log_dir = default_paths(self.ctx.env, "darwin").log_dir
        log_dir.mkdir(parents=True, exist_ok=True)  # launchd does not create log folders
        _write_atomic(self.path, render_plist(self.ctx.command_for(mode), mode, log_dir, env=self.ctx.env))
        notes = [f"wrote {self.path}"]
        self._launchctl("enable", self.target)  # clears a `launchctl disable` left from before
        if not start_now:
            return notes + ["launchd loads it at the next login"]
        if mode == "daemon" and self.ctx.daemon_answers():
            return notes + ["a daemon is already running: launchd takes over at the next login"]
        ran = self._reload()
        if ran.returncode != 0:
            raise AutostartError(f"launchctl bootstrap {self.domain} {self.path} failed: "
                                 f"{(ran.stderr or ran.stdout).strip()}",
                                 hint="the plist is written and loads at the next login; "
                                      "check `launchctl print " + self.target + "`")
        return notes + [f"loaded into launchd ({self.target}): running now"]

    def _reload(self) -> Ran:
        """bootout (not loaded is fine), wait until launchd has freed the label, then bootstrap."""
        self._launchctl("bootout", self.target)
        deadline = self.ctx.clock() + LAUNCHD_FREE_WAIT
        while self._loaded() and self.ctx.clock() < deadline:
            self.ctx.sleep(LAUNCHD_POLL)
        while True:
            ran = self._launchctl("bootstrap", self.domain, str(self.path))
            if ran.returncode not in BOOTSTRAP_BUSY or self.ctx.clock() >= deadline:
                return ran
            log.warning("launchctl bootstrap: %s; retrying in %.1f s",
                        (ran.stderr or ran.stdout).strip(), LAUNCHD_POLL)
            self.ctx.sleep(LAUNCHD_POLL)

    def disable(self, stop_now: bool) -> list[str]:
        notes = []
        if stop_now and self._launchctl("bootout", self.target).returncode == 0:
            notes.append(f"unloaded {self.target} (stopped)")
        if _remove(self.path):
            notes.append(f"removed {self.path}")
        return notes

    def _system_problems(self) -> list[str]:
        if self._disabled_override():
            return [f"{self.target} is disabled in launchd (`launchctl disable`); {REWRITE}"]
        return []

    def _loaded(self) -> bool | None:
        return self._launchctl("print", self.target).returncode == 0

    def _read(self, problems: list[str]) -> list[str]:
        try:
            data = plistlib.loads(self.path.read_bytes())
        except (plistlib.InvalidFileException, ExpatError, ValueError, OSError) as exc:
            problems.append(f"{self.path} is not a valid plist ({exc}); {REWRITE}")
            return []
        if not isinstance(data, dict) or data.get("Label") != LAUNCHD_LABEL:
            problems.append(f"{self.path}: Label is not {LAUNCHD_LABEL}; {REWRITE}")
        args = data.get("ProgramArguments") if isinstance(data, dict) else None
        if not (isinstance(args, list) and args and all(isinstance(a, str) for a in args)):
            problems.append(f"{self.path}: ProgramArguments is missing or empty; {REWRITE}")
            return []
        return list(args)

    def _disabled_override(self) -> bool:
        out = self._launchctl("print-disabled", self.domain).stdout
        for line in out.splitlines():
            if f'"{LAUNCHD_LABEL}"' in line:
                return line.split("=>")[-1].strip() in ("disabled", "true")
        return False


class XdgAutostart(_LoginFile):
    """Linux desktops: $XDG_CONFIG_HOME/autostart/dbtunneld.desktop starts the tray at login."""

    mechanism = "xdg"

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.path = ctx.config_home / "autostart" / DESKTOP_NAME

    def enable(self, mode: str, start_now: bool) -> list[str]:
        _write_atomic(self.path, render_desktop(self.ctx.command_for(mode), icon_path()))
        notes = [f"wrote {self.path}: the desktop starts the tray at the next login"]
        if start_now:
            notes.append("XDG autostart only acts at login: run `dbtunneld tray` to start it now")
        if not (self.ctx.env.get("DISPLAY") or self.ctx.env.get("WAYLAND_DISPLAY")):
            notes.append("no desktop session seen here: on a headless machine use --mode daemon")
        return notes

    def disable(self, stop_now: bool) -> list[str]:
        return [f"removed {self.path}"] if _remove(self.path) else []

    def _read(self, problems: list[str]) -> list[str]:
        parser = ConfigParser(interpolation=None, strict=False)
        parser.optionxform = str  # type: ignore[assignment]  # keys are case-sensitive
        try:
            parser.read_string(self.path.read_text("utf-8"))
            entry = parser["Desktop Entry"]
        except (ConfigParserError, KeyError, OSError, UnicodeDecodeError) as exc:
            problems.append(f"{self.path} is not a valid desktop entry ({exc}); {REWRITE}")
            return []
        if entry.get("Hidden", "false") == "true" or entry.get("X-GNOME-Autostart-enabled") == "false":
            problems.append(f"{self.path} is switched off (Hidden or X-GNOME-Autostart-enabled); "
                            f"{REWRITE}")
        if entry.get("Type") != "Application" or not entry.get("Exec"):
            problems.append(f"{self.path}: no Type=Application with an Exec line; {REWRITE}")
            return []
        return desktop_exec_split(entry["Exec"])


class SystemdUserUnit(_LoginFile):
    """Headless Linux: $XDG_CONFIG_HOME/systemd/user/dbtunneld.service runs the daemon."""

    mechanism = "systemd"

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.path = ctx.config_home / "systemd" / "user" / UNIT_NAME

    def _systemctl(self, *args: str) -> Ran:
        return self.ctx.run(["systemctl", "--user", *args], self.ctx.env)

    def manager_runs(self) -> bool:
        ran = self._systemctl("is-system-running")
        return ran.returncode != 127 and ran.stdout.strip() not in ("", "offline")

    def enable(self, mode: str, start_now: bool) -> list[str]:
        command = self.ctx.command_for(mode)
        if set(command[0]) & set("\"'\\") or not command[0].isprintable():
            raise AutostartError(f"systemd refuses a program path with quotes or backslashes: "
                                 f"{command[0]}", hint="install dbtunneld under a plain path "
                                 "(e.g. `pipx install dbtunneld`), or use --mode tray")
        _write_atomic(self.path, render_unit(command))
        notes = [f"wrote {self.path}"]
        manager = self.manager_runs()
        if manager:
            self._systemctl("daemon-reload")
        now = start_now and manager and not self.ctx.daemon_answers()
        ran = self._systemctl("enable", *(["--now"] if now else []), UNIT_NAME)
        if ran.returncode == 127:
            return notes + ["systemctl not found: the unit is written but not enabled; start "
                            "`dbtunneld daemon` from your session or init system instead"]
        if ran.returncode != 0:
            raise AutostartError(f"systemctl --user enable {UNIT_NAME} failed: "
                                 f"{(ran.stderr or ran.stdout).strip()}",
                                 hint=f"see `systemctl --user status {UNIT_NAME}`")
        return notes + [self._enable_note(manager, start_now, now)]

    @staticmethod
    def _enable_note(manager: bool, start_now: bool, now: bool) -> str:
        if now:
            return f"enabled and started {UNIT_NAME} (systemctl --user enable --now)"
        if not manager:
            return (f"enabled {UNIT_NAME}; no systemd user manager runs in this session, so it "
                    f"starts at the next login (`loginctl enable-linger` starts it at boot)")
        if start_now:
            return f"enabled {UNIT_NAME}; a daemon is already running: systemd starts it from the next login"
        return f"enabled {UNIT_NAME}: it starts at the next login"

    def disable(self, stop_now: bool) -> list[str]:
        if not self.path.exists():
            return []
        manager = self.manager_runs()
        self._systemctl("disable", *(["--now"] if stop_now and manager else []), UNIT_NAME)
        _remove(self.path)
        if manager:
            self._systemctl("daemon-reload")
        return [f"disabled {UNIT_NAME} and removed {self.path}"
                + ("" if stop_now or not manager else " (a running daemon keeps running)")]

    def _loaded(self) -> bool | None:
        if not self.manager_runs():
            return None
        return self._systemctl("is-active", UNIT_NAME).stdout.strip() == "active"

    def _system_problems(self) -> list[str]:
        ran = self._systemctl("is-enabled", UNIT_NAME)
        state = ran.stdout.strip()
        if ran.returncode == 127:
            return ["systemctl not found: nothing starts this unit at login"]
        if state != "enabled":
            return [f"`systemctl --user is-enabled {UNIT_NAME}` says {state or ran.stderr.strip()!r}; "
                    f"{REWRITE}"]
        return []

    def _read(self, problems: list[str]) -> list[str]:
        for line in self.path.read_text("utf-8", errors="replace").splitlines():
            if line.strip().startswith("ExecStart="):
                return systemd_split(line.split("=", 1)[1].strip())
        problems.append(f"{self.path}: no ExecStart line; {REWRITE}")
        return []


class RunKey:
    """Windows: HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run, value "dbtunneld"."""

    mechanism = "registry"

    def __init__(self, ctx: _Context) -> None:
        self.ctx = ctx
        self.reg = ctx.winreg
        self.location = f"HKCU\\{RUN_KEY}\\{RUN_VALUE}"

    def enable(self, mode: str, start_now: bool) -> list[str]:
        cmd = windows_command_line(self.ctx.command_for(mode))
        with self.reg.CreateKeyEx(self.reg.HKEY_CURRENT_USER, RUN_KEY, 0, self.reg.KEY_SET_VALUE) as k:
            self.reg.SetValueEx(k, RUN_VALUE, 0, self.reg.REG_SZ, cmd)
        self._delete(APPROVED_KEY)  # a "Disabled" mark from Task Manager would hide our entry
        notes = [f"set {self.location} = {cmd}"]
        if start_now:
            notes.append("Windows starts it at the next sign-in; run `dbtunneld tray` to start it now")
        return notes

    def disable(self, stop_now: bool) -> list[str]:
        removed = self._delete(RUN_KEY)
        self._delete(APPROVED_KEY)
        return [f"removed {self.location}"] if removed else []

    def status(self) -> AutostartStatus | None:
        value = self._query(RUN_KEY)
        if value is None:
            return None
        command = windows_split(str(value))
        problems = _program_missing(command, self.location)
        approved = self._query(APPROVED_KEY)
        if isinstance(approved, (bytes, bytearray)) and approved and approved[0] & 1:
            problems.append("switched off in Task Manager > Startup apps; switch it on there or "
                            "run `dbtunneld autostart enable`")
        return AutostartStatus(not problems, self.mechanism, _mode_of(command), self.location,
                               tuple(command), None, tuple(problems))

    def _query(self, key: str) -> Any:
        try:
            with self.reg.OpenKey(self.reg.HKEY_CURRENT_USER, key, 0, self.reg.KEY_READ) as k:
                return self.reg.QueryValueEx(k, RUN_VALUE)[0]
        except FileNotFoundError:
            return None

    def _delete(self, key: str) -> bool:
        try:
            with self.reg.OpenKey(self.reg.HKEY_CURRENT_USER, key, 0, self.reg.KEY_SET_VALUE) as k:
                self.reg.DeleteValue(k, RUN_VALUE)
            return True
        except FileNotFoundError:
            return False


# --- the public API ------------------------------------------------------------------------------


class Autostart:
    """Enable, disable and inspect the login item. Every input is injectable for tests:
    ``platform`` (sys.platform form), ``env`` (HOME, XDG_CONFIG_HOME...), ``run`` (launchctl and
    systemctl), ``winreg``, ``uid``, the interpreter path used to find the installed program, and
    ``clock`` / ``sleep`` for the bounded wait on launchd."""

    def __init__(self, platform: str | None = None, env: Mapping[str, str] | None = None,
                 run: Runner = run_tool, winreg: Any = None, uid: int | None = None,
                 executable: str | None = None,
                 which: Callable[[str], str | None] = shutil.which,
                 clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.platform = platform or sys.platform
        getuid = getattr(os, "getuid", lambda: 0)
        self.ctx = _Context(self.platform, dict(os.environ if env is None else env), run,
                            lambda mode: program_command(mode, self.platform, executable, which),
                            getuid() if uid is None else uid, winreg, clock, sleep)
        self.backends = self._backends()

    def _backends(self) -> dict[str, Any]:
        if self.platform == "darwin":
            agent = LaunchdAgent(self.ctx)
            return {"tray": agent, "daemon": agent}
        if _is_windows(self.platform):
            if self.ctx.winreg is None:
                import winreg  # type: ignore[import-not-found]  # Windows only
                self.ctx.winreg = winreg
            key = RunKey(self.ctx)
            return {"tray": key, "daemon": key}
        return {"tray": XdgAutostart(self.ctx), "daemon": SystemdUserUnit(self.ctx)}

    def default_mode(self) -> str:
        """The tray where a desktop can show it, the daemon on a headless Linux box."""
        if self.platform.startswith("linux") and not (
                self.ctx.env.get("DISPLAY") or self.ctx.env.get("WAYLAND_DISPLAY")):
            return "daemon"
        return "tray"

    def _distinct(self) -> list[Any]:
        seen: list[Any] = []
        for b in self.backends.values():
            if b not in seen:
                seen.append(b)
        return seen

    def status(self, mode: str | None = None) -> AutostartStatus:
        """The login item as the system sees it now; with ``mode``, only that mode's mechanism."""
        backends = [self.backends[_check_mode(mode)]] if mode else self._distinct()
        found = [s for s in (b.status() for b in backends) if s is not None]
        if not found:
            return AutostartStatus(False)
        if len(found) == 1:
            return found[0]
        both = (f"both {found[0].location} and {found[1].location} exist: systemd turns XDG "
                f"entries into units, so it would start twice; run `dbtunneld autostart enable "
                f"--mode tray|daemon` to keep one")
        return AutostartStatus(False, found[0].mechanism, found[0].mode, found[0].location,
                               found[0].command, found[0].loaded, found[0].problems + (both,))

    def is_enabled(self) -> bool:
        return self.status().enabled

    def enable(self, mode: str | None = None, start_now: bool = False) -> Change:
        """Install the login item for ``mode`` (replacing any other, never both).

        ``start_now`` also starts it through the login mechanism where one can (launchctl
        bootstrap, systemctl --user enable --now), unless a daemon already answers. The CLI
        passes True; the default (False) suits the running tray: no second copy of itself.
        """
        mode = _check_mode(mode or self.default_mode())
        target = self.backends[mode]
        try:
            notes = self._remove_others(target) + target.enable(mode, start_now)
        except OSError as exc:
            raise AutostartError(f"cannot write the login item: {exc}",
                                 hint="check the permissions of that folder") from exc
        for n in notes:
            log.info("autostart: %s", n)
        return Change(self.status(), tuple(notes))

    def _remove_others(self, target: Any) -> list[str]:
        notes: list[str] = []
        for other in self._distinct():
            removed = other.disable(stop_now=False) if other is not target else []
            if removed:
                notes += removed + [f"replaced the {other.mechanism} login item: never both "
                                    f"(systemd would start the program twice)"]
        return notes

    def disable(self, stop_now: bool = False) -> Change:
        """Remove every login item of ours. With ``stop_now`` also stop what launchd/systemd runs
        (the tray passes False: unchecking "Start at login" must not drop the tunnels)."""
        notes: list[str] = []
        for b in self._distinct():
            notes += b.disable(stop_now)
        if not notes:
            notes.append("nothing to remove: no login item was installed")
        for n in notes:
            log.info("autostart: %s", n)
        return Change(self.status(), tuple(notes))


def _check_mode(mode: str | None) -> str:
    if mode not in MODES:
        raise AutostartError(f"unknown autostart mode {mode!r}", hint="use --mode tray or --mode daemon")
    return mode


# Module-level shortcuts for the tray's "Start at login" checkbox.

def status(mode: str | None = None) -> AutostartStatus:
    return Autostart().status(mode)


def is_enabled() -> bool:
    return Autostart().is_enabled()


def enable(mode: str | None = None, start_now: bool = False) -> Change:
    return Autostart().enable(mode, start_now)


def disable(stop_now: bool = False) -> Change:
    return Autostart().disable(stop_now)


def run_cli(args: Any) -> int:
    """`dbtunneld autostart enable | disable | status`: print what was done, then the status."""
    import json

    auto = Autostart()
    action = getattr(args, "autostart_command", None) or "status"
    if action == "status":
        st = auto.status(getattr(args, "mode", None))
        print(json.dumps(st.to_dict(), indent=2) if getattr(args, "json", False) else st.describe())
        return 1 if st.problems else 0
    if action == "enable":
        change = auto.enable(getattr(args, "mode", None), start_now=not getattr(args, "no_start", False))
    else:
        change = auto.disable(stop_now=getattr(args, "stop", False))
    for note in change.notes:
        print(note)
    print(change.status.describe())
    ok = change.status.enabled if action == "enable" else change.status.location is None
    return 0 if ok else 1
