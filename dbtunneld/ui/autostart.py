"""Start at login: one login item per user, written from the templates in ``dbtunneld/templates``.

macOS: a LaunchAgent plist (launchd restarts it after a crash, not after a clean quit). Linux: an
XDG autostart entry for the tray on a desktop, or a systemd user unit for the headless daemon, never
both (systemd turns XDG entries into units: one program would start twice). Windows: a value under
HKCU\\...\\CurrentVersion\\Run. ``status()`` reads the truth from the system every time; nothing is
remembered. Front-end layer: the CLI and the tray's "Start at login" checkbox use this module.

Owns the choice of back-end per platform and mode (never two at once) and the CLI; each back-end is
its own module (``autostart_launchd``, ``autostart_xdg``, ``autostart_systemd``, ``autostart_windows``).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from typing import Any, Callable, Mapping

from .autostart_common import (MODES, AutostartError, AutostartStatus, Change, LoginContext, LoginItem, Runner, is_windows,
                               program_command, run_tool)
from .autostart_launchd import LaunchdAgent
from .autostart_systemd import SystemdUserUnit
from .autostart_windows import RunKey
from .autostart_xdg import XdgAutostart

log = logging.getLogger(__name__)


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
        self.ctx = LoginContext(self.platform, dict(os.environ if env is None else env), run,
                            lambda mode: program_command(mode, self.platform, executable, which),
                            getuid() if uid is None else uid, winreg, clock, sleep)
        self.backends = self._backends()

    def _backends(self) -> dict[str, LoginItem]:
        if self.platform == "darwin":
            agent = LaunchdAgent(self.ctx)
            return {"tray": agent, "daemon": agent}
        if is_windows(self.platform):
            if self.ctx.winreg is None:
                import winreg  # Windows only
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

    def _distinct(self) -> list[LoginItem]:
        seen: list[LoginItem] = []
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

    def _remove_others(self, target: LoginItem) -> list[str]:
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
