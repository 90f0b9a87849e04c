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

This module runs it (lock, logging, settings); the pieces: ``tray_desktop`` (checks, backend),
``tray_funnel``, ``tray_app`` + ``tray_actions`` (state and clicks), ``tray_pystray`` (icon, menus, runner).
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from ..core.config import UiSettings, load_config
from ..core.errors import ConfigError, NeedsUserError
from ..core.exitcodes import EXIT_FAIL as EXIT_NO_DESKTOP  # no desktop: a run-time failure
from ..adapters.log import setup_logging
from ..core.paths import Paths, default_paths, pid_alive
from .tray_desktop import DesktopUnavailable, check_desktop, choose_backend
from .tray_pystray import READY_TIMEOUT, TrayRunner, import_pystray

if TYPE_CHECKING:                  # imported where used: the daemon's module is not needed to draw the tray
    from ..process.daemon import InstanceLock

log = logging.getLogger(__name__)


class TrayAlreadyRunning(NeedsUserError):
    """Another tray of this user holds the tray lock."""

    hint = "use its icon in the menu bar / system tray (Quit there to start another)"


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


def hold_tray_lock(paths: Paths) -> InstanceLock:
    """One tray per user: an OS lock on run/tray.lock, released when the process ends."""
    from ..process.daemon import AlreadyRunningError, InstanceLock

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

