"""The tray's state: daemon status in, menu models out (``menu.build_menu``), following the daemon's
event stream (starting it when none answers, re-subscribing with backoff) and re-rendering the
countdowns. No pystray here: tests drive it directly; the clicks are ``tray_actions``'."""

from __future__ import annotations

import logging
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from ..core.config import UiSettings
from ..core.errors import DbtunneldError
from ..core.model import DaemonStatus
from ..core.paths import Paths
from ..process.client import Client, DaemonNotRunning, Subscription, ensure_daemon
from ..process.protocol import Event
from .clipboard import Clipboard, system_clipboard
from .menu import ClockReading, MenuModel, build_menu
from .notify import Notifier
from .tray_actions import TrayActions, ask_confirmation, open_target, read_autostart, spawn_detached, write_autostart

log = logging.getLogger(__name__)

TICK = 15.0                  # re-render countdowns this often (applied only when the text changed)
AUTOSTART_EVERY = 4          # re-read the login item every this many ticks
RESUBSCRIBE_MAX = 30.0


class TrayApp(TrayActions):
    """Status in, menu models out, clicks to requests. No pystray here: tests drive it directly."""

    def __init__(self, client: Client, *, paths: Paths, ui: UiSettings, submit: Callable[[MenuModel], None],
                 notifier: Notifier, clipboard: Callable[[], Clipboard] = system_clipboard,
                 clock: Callable[[], float] = time.time, stop_ui: Callable[[], None] = lambda: None,
                 start_daemon: Callable[[], Client] | None = None, platform: str = sys.platform,
                 confirm: Callable[[str], bool | None] = ask_confirmation,
                 opener: Callable[[str], None] = open_target,
                 autostart: Callable[[], bool | None] = read_autostart,
                 set_autostart: Callable[[bool], None] | None = None, config: Path | None = None,
                 launch_setup: Callable[[list[str]], subprocess.Popen[Any]] | None = None) -> None:
        self.client, self.paths, self.ui = client, paths, ui
        self.config = Path(config or paths.config_file)
        self._launch_setup = launch_setup or spawn_detached
        self._setup_proc: subprocess.Popen[Any] | None = None
        self.first_run_setup = False                 # `dbtunneld tray`: open the setup window when unconfigured
        self.submit, self.notifier, self.clock, self.stop_ui = submit, notifier, clock, stop_ui
        self._clipboard_factory, self._board = clipboard, None
        self._start_daemon = start_daemon or (lambda: ensure_daemon(paths))
        self.platform, self.confirm, self.opener = platform, confirm, opener
        self._read_autostart = autostart
        self._set_autostart = set_autostart or write_autostart
        self.status: DaemonStatus | None = None
        self.problem = ""
        self.connecting = True
        self.autostart = autostart()
        self._stop = threading.Event()
        self._retry = threading.Event()          # wakes follow_daemon for an immediate retry
        self._lock = threading.Lock()
        self._subscription: Subscription | None = None
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

    def _on_event(self, event: Event) -> None:
        """Status snapshots drive everything; other events (db.minted, ...) are followed by one."""
        if event.event == "status" and isinstance(event.data, dict):
            self.on_status(DaemonStatus.from_dict(event.data))
        else:
            log.debug("daemon event %s", event.event)
