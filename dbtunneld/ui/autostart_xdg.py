"""Linux desktops: the XDG autostart entry $XDG_CONFIG_HOME/autostart/dbtunneld.desktop starts the
tray at login (its Exec= quoting, the icon, reading the entry back)."""

from __future__ import annotations

from configparser import ConfigParser, Error as ConfigParserError
from importlib import resources
from typing import Sequence

from .autostart_common import REWRITE, LoginContext, LoginFile, remove_file, split_words, template, write_atomic

DESKTOP_NAME = "dbtunneld.desktop"
FALLBACK_ICON = "network-server"
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
    words = split_words(_unescape_desktop_string(value), escape)
    return [w.replace("%%", "%") for w in words]


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


def render_desktop(command: Sequence[str], icon: str) -> str:
    icon = icon.replace("\\", "\\\\")
    return template("autostart.desktop").substitute(exec=desktop_exec_quote(command), icon=icon)


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


class XdgAutostart(LoginFile):
    """Linux desktops: $XDG_CONFIG_HOME/autostart/dbtunneld.desktop starts the tray at login."""

    mechanism = "xdg"

    def __init__(self, ctx: LoginContext) -> None:
        self.ctx = ctx
        self.path = ctx.config_home / "autostart" / DESKTOP_NAME

    def enable(self, mode: str, start_now: bool) -> list[str]:
        write_atomic(self.path, render_desktop(self.ctx.command_for(mode), icon_path()))
        notes = [f"wrote {self.path}: the desktop starts the tray at the next login"]
        if start_now:
            notes.append("XDG autostart only acts at login: run `dbtunneld tray` to start it now")
        if not (self.ctx.env.get("DISPLAY") or self.ctx.env.get("WAYLAND_DISPLAY")):
            notes.append("no desktop session seen here: on a headless machine use --mode daemon")
        return notes

    def disable(self, stop_now: bool) -> list[str]:
        return [f"removed {self.path}"] if remove_file(self.path) else []

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
