"""`dbtunneld tray`: the pystray front-end, a client of the daemon.

The tray owns no tunnel: it starts the daemon when none answers, follows its status events,
renders ``menu.build_menu`` and sends the user's clicks back as control requests, so a tray
crash never drops a tunnel. Every change to the icon, tooltip and menu goes through one
``UiFunnel`` that applies the newest model on the UI thread (macOS traps on menu changes from
other threads). Before pystray is imported, ``check_desktop`` makes sure there is a display and
(for the GTK/AppIndicator backends) a D-Bus session bus; without one the tray exits with a clear
message instead of hanging, and a watchdog guards ``icon.run()`` the same way. macOS specifics
(main-thread AppKit calls, template icon, menu-bar-only app, open-menu watch) are in
``tray_darwin``; one tray per user holds ``run/tray.lock``.
"""

from __future__ import annotations

import importlib.resources
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

from . import autostart as autostart_mod
from . import tray_darwin
from .client import Client, DaemonNotRunning, ensure_daemon
from .clipboard import Clipboard, system_clipboard
from .config import UiSettings, load_config
from .errors import ConfigError, DbtunneldError, NeedsUserError
from .log import setup_logging
from .menu import ClockReading, MenuItem, MenuModel, build_menu, details_text
from .model import DaemonStatus, Health
from .notify import Notifier, desktop_sender
from .onboarding.launch import gui_command
from .exitcodes import EXIT_FAIL as EXIT_NO_DESKTOP  # no desktop: a run-time failure
from .paths import Paths, default_paths, pid_alive

log = logging.getLogger(__name__)

TICK = 15.0                  # re-render countdowns this often (applied only when the text changed)
AUTOSTART_EVERY = 4          # re-read the login item every this many ticks
READY_TIMEOUT = 20.0         # icon.run() must reach its setup callback within this
RESUBSCRIBE_MAX = 30.0


class TrayAlreadyRunning(NeedsUserError):
    """Another tray of this user holds the tray lock."""

    hint = "use its icon in the menu bar / system tray (Quit there to start another)"


class DesktopUnavailable(NeedsUserError):
    """No display or no session bus: a tray cannot run here (the daemon can)."""

    hint = ("run the tray inside your desktop session; the tunnels keep running in the daemon "
            "without it (`dbtunneld status`, `dbtunneld connect NAME`)")


# ----------------------------------------------------------------------------- desktop checks

def choose_backend(env: dict[str, str], platform: str = sys.platform) -> str:
    """PYSTRAY_BACKEND when set; else the native one (AppIndicator, then GTK, on Linux)."""
    if env.get("PYSTRAY_BACKEND"):
        return env["PYSTRAY_BACKEND"]
    if platform == "darwin":
        return "darwin"
    if platform.startswith("win"):
        return "win32"
    if _has_typelib("AyatanaAppIndicator3", "AppIndicator3") and status_notifier_watcher_present(env):
        return "appindicator"
    return "gtk"


STATUS_NOTIFIER_WATCHER = "org.kde.StatusNotifierWatcher"


def status_notifier_watcher_present(env: dict[str, str], timeout: float = 2.0) -> bool:
    """Whether a StatusNotifier watcher owns its name on the session bus. Without one, AppIndicator
    falls back to a GtkStatusIcon (an XEmbed tray icon) and that fallback logs
    "Gdk-CRITICAL: gdk_window_thaw_toplevel_updates: assertion ... failed" on every start; the GTK
    backend is the same XEmbed icon without the warning (seen under Xvfb with trayer)."""
    try:
        from gi.repository import Gio, GLib
    except ImportError:
        return False
    found: list[bool] = []

    def ask() -> None:                                # a bus that never answers must not hang us
        flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
        for address in session_bus_candidates(env):
            try:
                conn = Gio.DBusConnection.new_for_address_sync(address, flags, None, None)
                reply = conn.call_sync("org.freedesktop.DBus", "/org/freedesktop/DBus", "org.freedesktop.DBus",
                                       "NameHasOwner", GLib.Variant("(s)", (STATUS_NOTIFIER_WATCHER,)),
                                       GLib.VariantType("(b)"), Gio.DBusCallFlags.NONE, 1000, None)
                conn.close_sync(None)
                found.append(bool(reply.unpack()[0]))
                return
            except Exception as exc:                  # GLib.Error: the check is only a preference
                log.debug("session bus %s: %s", address, exc)

    worker = threading.Thread(target=ask, name="tray-watcher-check", daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(found and found[0])


def _has_typelib(*names: str) -> bool:
    try:
        import gi
    except ImportError:
        return False
    for name in names:
        try:
            gi.require_version(name, "0.1")      # checks availability without loading it
            return True
        except ValueError:
            continue
    return False


def check_desktop(env: dict[str, str], backend: str, platform: str = sys.platform) -> None:
    """Raise DesktopUnavailable naming what is missing (display, session bus)."""
    if platform == "darwin" or platform.startswith("win") or backend in ("darwin", "win32"):
        return
    _check_display(env)
    if backend in ("gtk", "appindicator"):
        _check_session_bus(env)


def _check_display(env: dict[str, str]) -> None:
    display = env.get("DISPLAY", "")
    if not display:
        if env.get("WAYLAND_DISPLAY"):
            return                                   # GTK speaks Wayland itself
        raise DesktopUnavailable("no display: DISPLAY is not set, so there is no desktop to put a tray icon on")
    try:
        from Xlib import display as xdisplay, error as xerror
    except ImportError:
        return
    try:
        xdisplay.Display(display).close()
    except (xerror.DisplayError, OSError) as exc:
        raise DesktopUnavailable(f"cannot open the X display {display!r}: {exc}") from None


def session_bus_candidates(env: dict[str, str]) -> list[str]:
    """The addresses GLib would try for the session bus."""
    address = env.get("DBUS_SESSION_BUS_ADDRESS", "")
    if address:
        return [a for a in address.split(";") if a]
    runtime = env.get("XDG_RUNTIME_DIR", "")
    if runtime and Path(runtime, "bus").exists():
        return [f"unix:path={Path(runtime, 'bus')}"]
    return []


def _check_session_bus(env: dict[str, str]) -> None:
    candidates = session_bus_candidates(env)
    if not candidates:
        raise DesktopUnavailable("no D-Bus session bus: DBUS_SESSION_BUS_ADDRESS is not set and "
                                 "$XDG_RUNTIME_DIR/bus does not exist (the tray menu needs one)",
                                 "start the tray in your desktop session, or run it under "
                                 "`dbus-run-session -- dbtunneld tray`")
    errors = []
    for address in candidates:
        problem = _probe_bus(address)
        if problem is None:
            return
        errors.append(problem)
    raise DesktopUnavailable(f"the D-Bus session bus does not answer ({'; '.join(errors)})",
                             "start the tray in your desktop session, or run it under "
                             "`dbus-run-session -- dbtunneld tray`")


def _probe_bus(address: str, timeout: float = 2.0) -> str | None:
    """None when a socket to ``address`` connects (or cannot be probed); else why not."""
    kind, _, rest = address.partition(":")
    params = dict(p.split("=", 1) for p in rest.split(",") if "=" in p)
    if kind == "unix" and ("path" in params or "abstract" in params):
        target = params["path"] if "path" in params else "\0" + params["abstract"]
        family = socket.AF_UNIX
    elif kind == "tcp" and "host" in params and "port" in params:
        target, family = (params["host"], int(params["port"])), socket.AF_INET
    else:
        return None                                  # launchd:, autolaunch:, ...: let GLib decide
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        try:
            s.connect(target)
        except OSError as exc:
            return f"{address.split(',')[0]}: {exc.strerror or exc}"
    return None


# ----------------------------------------------------------------------------- the funnel

class UiFunnel:
    """The one way to change icon, tooltip and menu: ``submit`` from any thread, applied on the UI thread.

    Submissions coalesce: only the newest model is applied, and only when it differs from the
    last one applied (so timers may submit freely without rebuilding an open menu). While the
    user has the menu open (``menu_opened`` .. ``menu_closed``, on the UI thread) nothing is
    applied: pystray's darwin and win32 backends map a click to an item by its position in the
    newest menu, so a line added above would make the click run its neighbour. On macOS an NSMenu
    delegate reports open and close (``tray_darwin``); GTK binds each item's own callback and
    needs no hold; win32 is not wired yet.
    """

    def __init__(self, schedule: Callable[[Callable[[], Any]], Any], apply: Callable[[MenuModel], None]) -> None:
        self._schedule = schedule
        self._apply = apply
        self._lock = threading.Lock()
        self._pending: MenuModel | None = None
        self._scheduled = False
        self._menu_open = False
        self.applied: MenuModel | None = None
        self.ui_thread: int | None = None

    def submit(self, model: MenuModel) -> None:
        with self._lock:
            self._pending = model
            if self._scheduled:
                return
            self._scheduled = True
        self._schedule(self._drain)

    def menu_opened(self) -> None:
        with self._lock:
            self._menu_open = True

    def menu_closed(self) -> None:
        """Apply what was held, on a later turn of the UI loop (after the click is dispatched)."""
        with self._lock:
            self._menu_open = False
            if self._pending is None or self._scheduled:
                return
            self._scheduled = True
        self._schedule(self._drain)

    def _drain(self) -> bool:
        with self._lock:
            if self._menu_open:
                self._scheduled = False              # kept pending: menu_closed schedules it
                return False
            model, self._pending, self._scheduled = self._pending, None, False
        if self.ui_thread is not None and threading.get_ident() != self.ui_thread:
            log.error("menu update ran outside the UI thread")
        if model is not None and model != self.applied:
            self._apply(model)
            self.applied = model
        return False                                 # GLib: do not repeat


def ui_scheduler(backend: str) -> Callable[[Callable[[], Any]], Any]:
    """How to run a function on the UI thread for this pystray backend."""
    if backend in ("gtk", "appindicator"):
        from gi.repository import GLib

        return lambda fn: GLib.idle_add(fn)
    if backend == "darwin":
        return tray_darwin.on_main_thread
    lock = threading.Lock()                          # win32 / xorg: pystray marshals internally

    def run_now(fn):
        with lock:
            fn()
    return run_now


# ----------------------------------------------------------------------------- icons and menus

def icon_image(health: Health, *, template: bool = False, size: int | None = None):
    """The shipped PNG for a state (package data), as a PIL image."""
    from PIL import Image

    size = size or (36 if template else 64)
    name = f"template-{health.value}-{size}.png" if template else f"{health.value}-{size}.png"
    with (importlib.resources.files("dbtunneld") / "icons" / name).open("rb") as f:
        image = Image.open(f)
        image.load()
    return image


def to_pystray_menu(pystray, items: tuple[MenuItem, ...], on_action: Callable[[tuple], None]):
    return pystray.Menu(*(_to_pystray_item(pystray, i, on_action) for i in items))


def _to_pystray_item(pystray, item: MenuItem, on_action):
    if item.separator:
        return pystray.Menu.SEPARATOR
    if item.submenu:
        return pystray.MenuItem(item.text, to_pystray_menu(pystray, item.submenu, on_action), enabled=item.enabled)
    action = item.action
    callback = (lambda icon, mi: on_action(action)) if action else (lambda icon, mi: None)
    checked = (lambda mi, value=item.checked: value) if item.checked is not None else None
    return pystray.MenuItem(item.text, callback, checked=checked, radio=item.radio, enabled=item.enabled)


# ----------------------------------------------------------------------------- helpers the app uses

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


# ----------------------------------------------------------------------------- the app

class TrayApp:
    """Status in, menu models out, clicks to requests. No pystray here: tests drive it directly."""

    def __init__(self, client: Client, *, paths: Paths, ui: UiSettings, submit: Callable[[MenuModel], None],
                 notifier: Notifier, clipboard: Callable[[], Clipboard] = system_clipboard,
                 clock: Callable[[], float] = time.time, stop_ui: Callable[[], None] = lambda: None,
                 start_daemon: Callable[[], Client] | None = None, platform: str = sys.platform,
                 confirm: Callable[[str], bool | None] = ask_confirmation,
                 opener: Callable[[str], None] = open_target,
                 autostart: Callable[[], bool | None] = read_autostart,
                 set_autostart: Callable[[bool], None] | None = None, config: Path | None = None,
                 launch_setup: Callable[[list[str]], subprocess.Popen] | None = None) -> None:
        self.client, self.paths, self.ui = client, paths, ui
        self.config = Path(config or paths.config_file)
        self._launch_setup = launch_setup or _spawn_detached
        self._setup_proc: subprocess.Popen | None = None
        self.first_run_setup = False                 # `dbtunneld tray`: open the setup window when unconfigured
        self.submit, self.notifier, self.clock, self.stop_ui = submit, notifier, clock, stop_ui
        self._clipboard_factory, self._board = clipboard, None
        self._start_daemon = start_daemon or (lambda: ensure_daemon(paths))
        self.platform, self.confirm, self.opener = platform, confirm, opener
        self._read_autostart = autostart
        self._set_autostart = set_autostart or _set_autostart
        self.status: DaemonStatus | None = None
        self.problem = ""
        self.connecting = True
        self.autostart = autostart()
        self._stop = threading.Event()
        self._retry = threading.Event()          # wakes follow_daemon for an immediate retry
        self._lock = threading.Lock()
        self._subscription = None
        self.threads: list[threading.Thread] = []

    # -- rendering
    def model(self) -> MenuModel:
        return build_menu(self.status, autostart=self.autostart, clock=ClockReading(self.clock()),
                          platform=self.platform, daemon_problem=self.problem,
                          config_path=str(self.config), log_path=str(self.paths.log_file),
                          connecting=self.connecting, needs_setup=not self.config.exists())

    def refresh(self) -> None:
        self.submit(self.model())

    def on_status(self, status: DaemonStatus) -> None:
        with self._lock:
            self.status, self.problem, self.connecting = status, "", False
        self.refresh()
        self.notifier.update(status, self.clock())

    def on_daemon_lost(self, problem: str) -> None:
        with self._lock:
            self.status, self.problem, self.connecting = None, problem, False
        self.refresh()

    # -- threads
    def start(self) -> None:
        self.refresh()
        if self.first_run_setup and not self.config.exists():     # the window opens by itself
            self.dispatch(("setup",))
        for name, target in (("tray-events", self.follow_daemon), ("tray-tick", self.tick)):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()
            self.threads.append(t)

    def stop(self) -> None:
        self._stop.set()
        self._retry.set()
        sub = self._subscription
        if sub is not None:
            sub.close()
        if self._board is not None:
            self._board.close()

    def tick(self) -> None:
        ticks = 0
        while not self._stop.wait(TICK):
            ticks += 1
            if ticks % AUTOSTART_EVERY == 0:
                self.autostart = self._read_autostart()
            self.refresh()

    def follow_daemon(self) -> None:
        """Start the daemon if none answers, then follow its events; on loss, retry with backoff."""
        delay = 1.0
        first = True
        while not self._stop.is_set():
            try:
                if first:
                    self.client = self._start_daemon()
                first = False
                self._follow_once()
                delay = 1.0
            except DbtunneldError as exc:
                first = False
                self.on_daemon_lost(exc.one_line())
                log.warning("daemon connection: %s; retrying in %.0f s", exc.message, delay)
            except OSError as exc:
                self.on_daemon_lost(str(exc))
                log.warning("daemon connection: %s; retrying in %.0f s", exc, delay)
            if self._retry.wait(delay) and self._stop.is_set():
                return
            if self._retry.is_set():
                self._retry.clear()
                delay = 1.0
            else:
                delay = min(delay * 2, RESUBSCRIBE_MAX)

    def _follow_once(self) -> None:
        sub = self.client.subscribe()
        self._subscription = sub
        try:
            for event in sub:
                if self._stop.is_set():
                    return
                self._on_event(event)
        finally:
            sub.close()
        if not self._stop.is_set():
            raise DaemonNotRunning("the daemon closed the event stream")

    def _on_event(self, event) -> None:
        """Status snapshots drive everything; other events (db.minted, ...) are followed by one."""
        if event.event == "status" and isinstance(event.data, dict):
            self.on_status(DaemonStatus.from_dict(event.data))
        else:
            log.debug("daemon event %s", event.event)

    # -- actions (called on the UI thread: hand off at once)
    def dispatch(self, action: tuple) -> threading.Thread:
        t = threading.Thread(target=self.run_action, args=(action,), name=f"tray-{action[0]}", daemon=True)
        t.start()
        return t

    def run_action(self, action: tuple) -> None:
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


def _spawn_detached(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True)


def _set_autostart(enabled: bool) -> None:
    if enabled:
        autostart_mod.enable("tray", start_now=False)
    else:
        autostart_mod.disable(stop_now=False)


# ----------------------------------------------------------------------------- running it

def load_ui_settings(config_path: Path) -> UiSettings:
    try:
        return load_config(config_path).ui
    except ConfigError as exc:
        log.warning("tray uses default UI settings: %s", exc.message.splitlines()[0])
        return UiSettings()


def run_tray(paths: Paths | None = None, config_path: str | Path | None = None,
             env: dict[str, str] | None = None) -> int:
    """`dbtunneld tray`: returns the exit code (1 with a message when no desktop is available)."""
    env = dict(os.environ if env is None else env)
    paths = paths or default_paths(env)
    backend = choose_backend(env)
    try:
        check_desktop(env, backend)
        lock = hold_tray_lock(paths)
    except (DesktopUnavailable, TrayAlreadyRunning) as exc:
        print(f"dbtunneld tray: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return EXIT_NO_DESKTOP
    try:
        return _run_locked(paths, config_path, env, backend)
    finally:
        lock.release()


def hold_tray_lock(paths: Paths):
    """One tray per user: an OS lock on run/tray.lock, released when the process ends."""
    from .daemon import AlreadyRunningError, InstanceLock

    lock = InstanceLock(paths.runtime_dir / "tray.lock")
    try:
        return lock.acquire()
    except AlreadyRunningError:
        holder = lock.holder_pid()
        raise TrayAlreadyRunning(f"a dbtunneld tray is already running{f' (pid {holder})' if holder else ''}") from None


def _run_locked(paths: Paths, config_path: str | Path | None, env: dict[str, str], backend: str) -> int:
    try:
        pystray = import_pystray(backend)
    except DesktopUnavailable as exc:
        print(f"dbtunneld tray: {exc.message}\nhint: {exc.hint}", file=sys.stderr)
        return EXIT_NO_DESKTOP
    config = Path(config_path) if config_path else paths.config_file
    setup_logging(paths.log_dir / "tray.log", stderr=True)
    tempfile.tempdir = str(private_icon_dir(paths.runtime_dir))
    ui = load_ui_settings(config)
    ready_timeout = float(env.get("DBTUNNELD_TRAY_READY_TIMEOUT") or READY_TIMEOUT)
    runner = TrayRunner(pystray, backend, paths, config, ui, ready_timeout)
    runner.app.first_run_setup = True
    return runner.run()


def private_icon_dir(runtime_dir: Path, pid: int | None = None) -> Path:
    """A 0700 temp folder for this tray process, emptied of dead trays' leftovers.

    pystray writes every icon image to a temp file and deletes it only on a clean stop, so a
    killed tray would leave them in /tmp; here they stay private and the next start sweeps them.
    """
    root = runtime_dir / "tray-tmp"
    root.mkdir(parents=True, exist_ok=True, mode=0o700)
    for old in root.iterdir():
        if old.name.isdigit() and not pid_alive(int(old.name)):
            shutil.rmtree(old, ignore_errors=True)
    mine = root / str(pid or os.getpid())
    mine.mkdir(exist_ok=True, mode=0o700)
    return mine



def import_pystray(backend: str):
    os.environ["PYSTRAY_BACKEND"] = backend          # must be set before the first import
    try:
        if backend in ("gtk", "appindicator"):
            from gi.repository import GLib

            GLib.set_prgname("dbtunneld")            # window class and notification app name
        import pystray
    except ModuleNotFoundError as exc:               # a headless install (no `tray` extra)
        raise DesktopUnavailable(f"the tray is not installed ({exc})",
                                 "pip install 'dbtunneld[tray]' (pipx: pipx install 'dbtunneld[tray]')") from None
    except Exception as exc:                         # with no display Xlib raises its own errors
        raise DesktopUnavailable(f"the {backend} tray backend cannot start: {exc}") from None
    return pystray


class TrayRunner:
    """Glue between pystray and TrayApp: the icon, the funnel, the guarded main loop."""

    def __init__(self, pystray, backend: str, paths: Paths, config: Path, ui: UiSettings,
                 ready_timeout: float = READY_TIMEOUT) -> None:
        self.pystray, self.backend, self.ready_timeout = pystray, backend, ready_timeout
        self.ready = threading.Event()
        self.funnel = UiFunnel(ui_scheduler(backend), self.apply)
        self.icon = self._make_icon()
        notifier = Notifier(desktop_sender(self.icon, platform="darwin" if self._mac() else sys.platform),
                            enabled=ui.notifications)
        self.app = TrayApp(Client(paths.socket_path), paths=paths, ui=ui, submit=self.funnel.submit,
                           notifier=notifier, stop_ui=lambda: self.on_ui(self.icon.stop),
                           start_daemon=lambda: ensure_daemon(paths, config), config=config)
        self._terminate_watch = tray_darwin.watch_termination(self.app.stop) if self._mac() else None

    def _mac(self) -> bool:
        return self.backend == "darwin"

    def _template(self) -> bool:
        return self._mac()

    def _make_icon(self):
        """pystray's icon; on macOS the template-image subclass, as a menu bar extra, menu watched."""
        image = icon_image(Health.IDLE, template=self._template())
        if not self._mac():
            return self.pystray.Icon("dbtunneld", image, title="dbtunneld")
        tray_darwin.use_accessory_policy()
        icon = tray_darwin.template_icon_class(self.pystray.Icon)("dbtunneld", image, title="dbtunneld")
        icon.menu_watch = tray_darwin.menu_watch(self.funnel.menu_opened, self.funnel.menu_closed)
        return icon

    def on_ui(self, fn: Callable[[], Any]) -> None:
        """AppKit calls from pystray's setup thread or a menu action go to the main thread."""
        if self._mac():
            tray_darwin.on_main_thread(fn)
        else:
            fn()

    def apply(self, model: MenuModel) -> None:
        """Runs on the UI thread only (through the funnel)."""
        icon = self.icon
        if self.funnel.applied is None or model.health != self.funnel.applied.health:
            icon.icon = icon_image(model.health, template=self._template())
        icon.title = model.tooltip
        self._set_hover_text(model.tooltip)
        icon.menu = to_pystray_menu(self.pystray, model.items, self.app.dispatch)

    def _set_hover_text(self, text: str) -> None:
        """pystray's GTK backend sets only the title; the hover tooltip needs the status icon itself."""
        status_icon = getattr(self.icon, "_status_icon", None) if self.backend == "gtk" else None
        if status_icon is not None:
            status_icon.set_tooltip_text(text)

    def _setup(self, icon) -> None:
        self.ready.set()
        self.on_ui(self._show)
        self.app.start()

    def _show(self) -> None:
        self.icon.visible = True

    def _watchdog(self) -> None:
        if not self.ready.wait(self.ready_timeout):
            print(f"dbtunneld tray: the {self.backend} tray backend did not start within {self.ready_timeout:g} s "
                  f"(no working display or D-Bus session?)\nhint: {DesktopUnavailable.hint}", file=sys.stderr)
            os._exit(EXIT_NO_DESKTOP)

    def run(self) -> int:
        self.funnel.ui_thread = threading.get_ident()
        threading.Thread(target=self._watchdog, name="tray-watchdog", daemon=True).start()
        log.info("tray starting (backend %s)", self.backend)
        try:
            self.icon.run(setup=self._setup)
        except Exception as exc:
            print(f"dbtunneld tray: the tray stopped: {exc}\nhint: {DesktopUnavailable.hint}", file=sys.stderr)
            return EXIT_NO_DESKTOP
        finally:
            self.app.stop()
        log.info("tray stopped")
        return 0
