"""Glue between pystray and ``TrayApp``: the icon images, menu models turned into pystray menus,
importing pystray for a backend, and ``TrayRunner`` (the icon, the funnel, the guarded main loop;
macOS specifics in ``tray_darwin``)."""

from __future__ import annotations

import importlib.resources
import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any, Callable

from ..core.config import UiSettings
from ..process.client import Client, ensure_daemon
from . import tray_darwin
from ..core.exitcodes import EXIT_FAIL as EXIT_NO_DESKTOP  # no desktop: a run-time failure
from ..core.model import Health
from ..core.paths import Paths
from .menu import MenuItem, MenuModel
from .notify import Notifier, desktop_sender
from .tray_app import TrayApp
from .tray_desktop import DesktopUnavailable
from .tray_funnel import UiFunnel, ui_scheduler

log = logging.getLogger(__name__)

READY_TIMEOUT = 20.0         # icon.run() must reach its setup callback within this


def icon_image(health: Health, *, template: bool = False, size: int | None = None) -> Any:
    """The shipped PNG for a state (package data), as a PIL image."""
    from PIL import Image

    size = size or (36 if template else 64)
    name = f"template-{health.value}-{size}.png" if template else f"{health.value}-{size}.png"
    with (importlib.resources.files("dbtunneld") / "icons" / name).open("rb") as f:
        image = Image.open(f)
        image.load()
    return image


def to_pystray_menu(pystray: Any, items: tuple[MenuItem, ...], on_action: Callable[[tuple[Any, ...]], object]) -> Any:
    return pystray.Menu(*(_to_pystray_item(pystray, i, on_action) for i in items))


def _to_pystray_item(pystray: Any, item: MenuItem, on_action: Callable[[tuple[Any, ...]], object]) -> Any:
    if item.separator:
        return pystray.Menu.SEPARATOR
    if item.submenu:
        return pystray.MenuItem(item.text, to_pystray_menu(pystray, item.submenu, on_action), enabled=item.enabled)
    action = item.action
    callback = (lambda icon, mi: on_action(action)) if action else (lambda icon, mi: None)
    checked = (lambda mi, value=item.checked: value) if item.checked is not None else None
    return pystray.MenuItem(item.text, callback, checked=checked, radio=item.radio, enabled=item.enabled)


def import_pystray(backend: str) -> Any:
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

    def __init__(self, pystray: Any, backend: str, paths: Paths, config: Path, ui: UiSettings,
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

    def _make_icon(self) -> Any:
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

    def _setup(self, icon: Any) -> None:
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

    def _hide_icon(self) -> None:
        """Hide the icon here, on the UI thread, once its loop has ended: otherwise pystray's
        ``Icon.__del__`` hides it from whichever thread collects it (on macOS an NSStatusItem call
        off the main thread, which AppKit forbids)."""
        try:
            if self.icon.visible:
                self.icon.visible = False
        except Exception as exc:                        # the backend may already be torn down
            log.debug("hiding the tray icon after its loop ended: %s", exc)

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
            self._hide_icon()
            self.app.stop()
        log.info("tray stopped")
        return 0

