"""Can a tray run here, and with which pystray backend: the display, the D-Bus session bus (and a
StatusNotifier watcher for AppIndicator), checked before pystray is imported so that a desktop-less
machine gets a clear message instead of a hang."""

from __future__ import annotations

import logging
import socket
import sys
import threading
from pathlib import Path

from ..core.errors import NeedsUserError

log = logging.getLogger(__name__)


class DesktopUnavailable(NeedsUserError):
    """No display or no session bus: a tray cannot run here (the daemon can)."""

    hint = ("run the tray inside your desktop session; the tunnels keep running in the daemon "
            "without it (`dbtunneld status`, `dbtunneld connect NAME`)")


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
    target: str | tuple[str, int]
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

