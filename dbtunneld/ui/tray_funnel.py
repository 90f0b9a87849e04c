"""The one way the tray changes its icon, tooltip and menu: ``UiFunnel`` coalesces menu models from
any thread and applies the newest on the UI thread (never while the user has the menu open), and
``ui_scheduler`` says how to run a function on that thread for each pystray backend."""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable

from . import tray_darwin
from .menu import MenuModel

log = logging.getLogger(__name__)


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

    def run_now(fn: Callable[[], Any]) -> None:
        with lock:
            fn()
    return run_now

