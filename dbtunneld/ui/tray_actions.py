"""What the tray's menu items do: each click becomes a control request to the daemon (or a local
action: copy, open, confirm, autostart, the setup window) on its own thread, and a failure becomes a
notification, never a dead tray. ``TrayActions`` is the part of ``tray_app.TrayApp`` that owns the clicks."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from ..core.config import UiSettings
from ..core.errors import DbtunneldError, NeedsUserError
from ..core.model import DaemonStatus
from ..process.client import Client
from . import autostart as autostart_mod
from .clipboard import Clipboard
from .menu import details_text
from .notify import Notifier
from .onboarding.launch import gui_command

log = logging.getLogger(__name__)


def open_target(target: str, platform: str = sys.platform) -> None:
    """Open a file or URL with the desktop's handler, without waiting for it."""
    if platform.startswith("win"):
        os.startfile(target)  # type: ignore[attr-defined]
        return
    opener = "open" if platform == "darwin" else "xdg-open"
    if not shutil.which(opener):
        raise NeedsUserError(f"cannot open {target}: {opener} is not installed", f"open it by hand: {target}")
    proc = subprocess.Popen([opener, target], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    threading.Thread(target=proc.wait, name="opener-reaper", daemon=True).start()


def ask_confirmation(question: str, platform: str = sys.platform) -> bool | None:
    """Yes/no in a dialog (zenity, kdialog, osascript); None when no dialog tool exists."""
    if platform == "darwin" and shutil.which("osascript"):
        script = ('on run argv\ndisplay dialog (item 1 of argv) buttons {"Cancel", "Copy"} '
                  'default button "Cancel" with icon caution\nend run')
        argv = ["osascript", "-e", script, question]
    elif shutil.which("zenity"):
        argv = ["zenity", "--question", "--title=dbtunneld", f"--text={question}", "--ok-label=Copy",
                "--cancel-label=Cancel", "--default-cancel"]
    elif shutil.which("kdialog"):
        argv = ["kdialog", "--title", "dbtunneld", "--warningyesno", question]
    else:
        return None
    return subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True).returncode == 0


def read_autostart() -> bool | None:
    try:
        return autostart_mod.is_enabled()
    except Exception as exc:           # an unsupported or broken login item shows as "unknown"
        log.info("autostart state unknown: %s", exc)
        return None


def spawn_detached(argv: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)


def write_autostart(enabled: bool) -> None:
    if enabled:
        autostart_mod.enable("tray", start_now=False)
    else:
        autostart_mod.disable(stop_now=False)



class TrayActions:
    """The ``do_*`` of each menu action (called on the UI thread: ``dispatch`` hands off at once).
    The state below is ``TrayApp``'s."""

    client: Client
    ui: UiSettings
    config: Path
    status: DaemonStatus | None
    notifier: Notifier
    confirm: Callable[[str], bool | None]
    opener: Callable[[str], None]
    autostart: bool | None
    problem: str
    connecting: bool
    stop_ui: Callable[[], None]
    _board: Clipboard | None
    _clipboard_factory: Callable[[], Clipboard]
    _read_autostart: Callable[[], bool | None]
    _set_autostart: Callable[[bool], None]
    _launch_setup: Callable[[list[str]], subprocess.Popen[Any]]
    _setup_proc: subprocess.Popen[Any] | None
    _start_daemon: Callable[[], Client]
    _lock: threading.Lock
    _retry: threading.Event

    def refresh(self) -> None:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def dispatch(self, action: tuple[Any, ...]) -> threading.Thread:
        t = threading.Thread(target=self.run_action, args=(action,), name=f"tray-{action[0]}", daemon=True)
        t.start()
        return t

    def run_action(self, action: tuple[Any, ...]) -> None:
        kind, args = action[0], action[1:]
        log.info("menu: %s %s", kind, " ".join(str(a) for a in args[:1]))
        try:
            getattr(self, f"do_{kind}")(*args)
        except DbtunneldError as exc:
            self.notifier.show(f"dbtunneld: {kind.replace('_', ' ')} failed", exc.one_line())
        except Exception as exc:                     # a click must never kill the tray
            log.exception("menu action %s failed", kind)
            self.notifier.show(f"dbtunneld: {kind.replace('_', ' ')} failed", str(exc))

    def do_connect(self, name: str) -> None:
        self.client.request("connect", name=name, wait=0.0)

    def do_disconnect(self, name: str) -> None:
        self.client.request("disconnect", name=name)

    def do_reconnect(self, name: str) -> None:
        self.client.request("reconnect", name=name)

    def do_renew(self, name: str) -> None:
        self.client.request("renew", name=name)

    def do_connect_all(self) -> None:
        self.client.request("connect", all=True, wait=0.0)      # as `dbtunneld connect --all`

    def do_show_details(self, name: str) -> None:
        t = next((t for t in (self.status.tunnels if self.status else ()) if t.name == name), None)
        if t is not None:
            self.notifier.show(f"dbtunneld: {name}", details_text(t))

    def do_copy(self, name: str, field: str) -> None:
        value = self._creds_field(name, field)
        seconds = self.ui.clipboard_clear_seconds
        if self._board is None:
            self._board = self._clipboard_factory()
        self._board.copy(value, secret=field == "password", clear_after=seconds if seconds > 0 else None)

    def do_confirm_copy(self, name: str, field: str) -> None:
        answer = self.confirm(f"Copy the {field} of the PRODUCTION cluster {name} to the clipboard?")
        if answer is None:
            self.notifier.show(f"dbtunneld: {name} is a production cluster",
                               f"No dialog tool to confirm with (zenity/kdialog). Copy it from a terminal: "
                               f"dbtunneld creds {name} --copy")
        elif answer:
            self.do_copy(name, field)

    def do_reset_password(self, name: str) -> None:
        answer = self.confirm(f"Make a new local password for {name}? Saved logins will need it; open sessions go on.")
        if answer is None:
            self.notifier.show(f"dbtunneld: {name}", f"No dialog tool to confirm with: run dbtunneld reset-password {name}")
        elif answer:
            self.client.request("reset_password", name=name)
            self.notifier.show(f"dbtunneld: {name}", "New local password: use Copy password")

    def do_open_client(self, name: str) -> None:
        self.opener(self._creds_field(name, "url"))

    def do_open_path(self, path: str) -> None:
        self.opener(path)

    def do_set_autostart(self, enabled: bool) -> None:
        self._set_autostart(enabled)
        self.autostart = self._read_autostart()
        self.refresh()

    def do_sign_in(self) -> None:
        info = self.client.request("login", wait=0.0)
        if info.get("signed_in"):
            return
        url = info.get("verification_uri_complete") or info.get("verification_uri", "")
        if url:
            self.opener(url)
        if info.get("user_code"):
            self.notifier.show("dbtunneld: confirm the sign-in in your browser",
                               f"Code {info['user_code']}: confirm it on {url}")
        else:
            self.notifier.show("dbtunneld: sign in to AWS in your browser", "The browser returns to dbtunneld when done")

    def do_setup(self) -> None:
        """The first-run window (`dbtunneld init --gui`, its own process: Tk never meets pystray)."""
        with self._lock:
            if self._setup_proc is not None and self._setup_proc.poll() is None:
                return                               # already open
            self._setup_proc = proc = self._launch_setup(gui_command(self.config))
        proc.wait()
        log.info("setup window closed (exit %s)", proc.returncode)
        self._retry.set()                            # the window started the daemon: follow it now
        self.refresh()

    def do_start_daemon(self) -> None:
        with self._lock:
            self.connecting, self.problem = True, ""
        self.refresh()
        try:
            self.client = self._start_daemon()
        finally:
            self._retry.set()                        # follow_daemon re-subscribes at once

    def do_quit(self) -> None:
        self.stop()
        self.stop_ui()

    def do_quit_all(self) -> None:
        try:
            self.client.request("stop")
        finally:
            self.do_quit()

    def _creds_field(self, name: str, field: str) -> str:
        result = self.client.request("creds", name=name, field=field)
        value = result.get(field) if isinstance(result, dict) else result
        if not value:
            raise NeedsUserError(f"{name} has no {field} yet", "connect it first")
        return str(value)
