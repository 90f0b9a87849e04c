"""The tray: desktop checks, the one UI funnel, the app's requests to the daemon, and a real tray
under Xvfb with a private D-Bus session bus and a tray host (trayer).

The end-to-end test runs `dbtunneld tray` on the sandbox stack: the tray starts the daemon, the
icon appears, "Connect" and then "Copy password" are clicked in the real menu, the clipboard (read
with xclip) holds that lease's password (it logs into MariaDB through the tunnel), it is cleared
after the delay, and killing the tray leaves the tunnel up. Screenshots of the open menu go to
test-artifacts/. A second, faster one drives the GTK backend against a control server with a
scripted status (``ScriptedDaemon``); the app-level tests use that server too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from dbtunneld.core.config import UiSettings
from dbtunneld.process import control
from dbtunneld.process.client import Client
from dbtunneld.ui import tray, tray_app, tray_desktop, tray_funnel, tray_pystray
from dbtunneld.ui.clipboard import Copied
from dbtunneld.ui.menu import MenuModel
from dbtunneld.core.model import (CredentialState as C, CredentialStatus, DaemonStatus, Health, TunnelState as T,
                             TunnelStatus)
from dbtunneld.core.paths import default_paths
from dbtunneld.ui.notify import Notifier

from helpers.xsession import Desktop, missing_tools, stop_pid, wait_for

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
PASSWORD = "A1a-lease-password-Zx9"          # what the "lease" hands out
MISSING = missing_tools(("Xvfb", "dbus-daemon", "trayer", "xdotool", "xclip", "import"))


def short_home(prefix: str) -> Path:
    """A short private folder (Unix socket paths are limited to ~107 bytes)."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


def scripted_status(now: float | None = None) -> DaemonStatus:
    now = now or time.time()
    return DaemonStatus(
        version="test", pid=os.getpid(), started_at=now - 60, config_path="/tmp/config.toml", log_path="/tmp/d.log",
        aws=CredentialStatus("aws", "sandbox", C.VALID, identity="arn:aws:sts::1:assumed-role/dev/alice",
                             expires_at=now + 8 * 3600),
        vault=CredentialStatus("vault", "http://127.0.0.1:8200", C.VALID, expires_at=now + 3600),
        tunnels=(TunnelStatus("orders", 13306, T.UP, since=now - 120, username="v-orders-1", autoconnect=True),
                 TunnelStatus("billing", 13307, T.STOPPED, production=True, autoconnect=True)))


class ScriptedDaemon:
    """The dispatch of a control server: a status snapshot and credentials, every call recorded."""

    def __init__(self, status: DaemonStatus | None = None):
        self.status = status or scripted_status()
        self.calls: list[tuple[str, dict]] = []

    def __call__(self, req):
        self.calls.append((req.cmd, dict(req.args)))
        if req.cmd == "status":
            return self.status.to_dict()
        if req.cmd == "creds":
            return {"username": "v-orders-1", "password": PASSWORD, "url": "mysql://v-orders-1@127.0.0.1:13306/app",
                    "mysql": "mysql -h 127.0.0.1 -P 13306 -u v-orders-1 -p app"}
        if req.cmd == "login":
            return {"signed_in": False, "verification_uri_complete": "http://127.0.0.1:1/device?code=ABCD",
                    "user_code": "ABCD"}
        if req.cmd == "stop":
            return {"pid": os.getpid()}
        return {}

    def commands(self):
        return [c for c in self.calls if c[0] not in ("status",)]


@pytest.fixture
def home():
    import shutil

    d = short_home("dbt-tray-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def daemon(home):
    script = ScriptedDaemon()
    paths = default_paths({"DBTUNNELD_HOME": str(home / "dbt"), "HOME": str(home)})
    server = control.ControlServer(paths.socket_path, script).start()
    script.paths = paths
    yield script
    server.close()


# ----------------------------------------------------------------------------- desktop checks

def test_no_display_is_a_clear_error():
    with pytest.raises(tray_desktop.DesktopUnavailable, match="DISPLAY is not set"):
        tray_desktop.check_desktop({}, "appindicator", platform="linux")


def test_unreachable_session_bus_is_a_clear_error(tmp_path):
    with pytest.raises(tray_desktop.DesktopUnavailable, match="does not answer") as info:
        tray_desktop._check_session_bus({"DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path}/nothing,guid=1"})
    assert "dbus-run-session" in info.value.hint
    with pytest.raises(tray_desktop.DesktopUnavailable, match="no D-Bus session bus"):
        tray_desktop._check_session_bus({"XDG_RUNTIME_DIR": str(tmp_path)})


def test_session_bus_addresses_are_probed(tmp_path):
    path = tmp_path / "bus"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(path))
        listener.listen(1)
        tray_desktop._check_session_bus({"XDG_RUNTIME_DIR": str(tmp_path)})             # the default path
        tray_desktop._check_session_bus({"DBUS_SESSION_BUS_ADDRESS": f"unix:path=/nope;unix:path={path}"})
    assert tray_desktop.session_bus_candidates({"DBUS_SESSION_BUS_ADDRESS": "unix:abstract=/tmp/x,guid=2"}) == [
        "unix:abstract=/tmp/x,guid=2"]
    assert tray_desktop._probe_bus("autolaunch:") is None


def test_backend_choice():
    assert tray_desktop.choose_backend({"PYSTRAY_BACKEND": "xorg"}, "linux") == "xorg"
    assert tray_desktop.choose_backend({}, "darwin") == "darwin"
    assert tray_desktop.choose_backend({}, "win32") == "win32"
    assert tray_desktop.choose_backend({}, "linux") in ("appindicator", "gtk")
    tray_desktop.check_desktop({}, "darwin", platform="darwin")                        # nothing to check there


# ----------------------------------------------------------------------------- the funnel

@pytest.mark.skipif(shutil.which("dbus-daemon") is None, reason="needs dbus-daemon")
def test_appindicator_only_when_a_status_notifier_watcher_is_on_the_bus(home):
    """Without a watcher AppIndicator falls back to an XEmbed icon that logs a Gdk-CRITICAL at start."""
    gi = pytest.importorskip("gi")
    from gi.repository import Gio

    if not tray_desktop._has_typelib("AyatanaAppIndicator3", "AppIndicator3"):
        pytest.skip("no AppIndicator typelib")
    d = Desktop(home)
    try:
        d.start_bus()
        env = {"DBUS_SESSION_BUS_ADDRESS": d.bus_address}
        assert tray_desktop.choose_backend(env, "linux") == "gtk"
        flags = Gio.DBusConnectionFlags.AUTHENTICATION_CLIENT | Gio.DBusConnectionFlags.MESSAGE_BUS_CONNECTION
        conn = Gio.DBusConnection.new_for_address_sync(d.bus_address, flags, None, None)
        owner = Gio.bus_own_name_on_connection(conn, tray_desktop.STATUS_NOTIFIER_WATCHER, Gio.BusNameOwnerFlags.NONE,
                                               None, None)
        wait_for(lambda: tray_desktop.status_notifier_watcher_present(env), 5, "the watcher name to be owned")
        assert tray_desktop.choose_backend(env, "linux") == "appindicator"
        Gio.bus_unown_name(owner)
        conn.close_sync(None)
    finally:
        d.stop()


def test_funnel_coalesces_and_applies_on_the_ui_thread():
    queue, applied = [], []

    def apply(model):
        applied.append((model, threading.get_ident()))

    funnel = tray_funnel.UiFunnel(queue.append, apply)
    ui_thread = threading.Thread(target=lambda: None)
    models = [MenuModel((), Health.OK, f"tip {i}") for i in range(3)]
    workers = [threading.Thread(target=funnel.submit, args=(m,)) for m in models]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert len(queue) == 1, "a burst schedules one apply"
    done = []
    ui_thread = threading.Thread(target=lambda: done.append(queue.pop()()))
    funnel.ui_thread = None
    ui_thread.start()
    ui_thread.join()
    assert len(applied) == 1 and applied[0][0].tooltip.startswith("tip ")
    assert applied[0][1] == ui_thread.ident
    funnel.submit(applied[0][0])                      # unchanged: scheduled but not applied again
    queue.pop()()
    assert len(applied) == 1
    funnel.submit(MenuModel((), Health.DEGRADED, "new"))
    queue.pop()()
    assert applied[-1][0].tooltip == "new"


# ----------------------------------------------------------------------------- the app (no screen)

class FakeBoard:
    def __init__(self):
        self.copies = []

    def copy(self, text, *, secret=False, clear_after=None):
        self.copies.append((text, secret, clear_after))
        return Copied(secret, clear_after)

    def close(self):
        pass


def make_app(daemon, **kw):
    board = FakeBoard()
    models, shown, opened = [], [], []
    notifier = Notifier(lambda title, message: shown.append((title, message)))
    app = tray_app.TrayApp(Client(daemon.paths.socket_path), paths=daemon.paths, ui=UiSettings(clipboard_clear_seconds=7),
                       submit=models.append, notifier=notifier, clipboard=lambda: board,
                       start_daemon=lambda: Client(daemon.paths.socket_path), platform="linux",
                       opener=opened.append, autostart=lambda: False, **kw)
    app.board, app.models, app.shown, app.opened = board, models, shown, opened
    return app


def test_app_follows_the_daemon_and_renders_its_status(daemon):
    app = make_app(daemon)
    app.start()
    try:
        wait_for(lambda: app.status is not None, 10, "the first status event")
        model = wait_for(lambda: app.models and app.models[-1].health is Health.PARTIAL and app.models[-1], 10, "a model")
        assert model.find("● orders").text.startswith("● orders  127.0.0.1:13306  up since")
        assert model.tooltip == "dbtunneld: 1/2 up, 1 off"
    finally:
        app.stop()


def test_menu_actions_become_requests(daemon):
    app = make_app(daemon, confirm=lambda question: True)
    app.on_status(scripted_status())
    for action in [("connect", "billing"), ("disconnect", "orders"), ("reconnect", "orders"), ("renew", "orders"),
                   ("connect_all",), ("open_client", "orders"), ("open_path", "/tmp/config.toml"),
                   ("show_details", "billing")]:
        app.run_action(action)
    assert daemon.commands() == [
        ("connect", {"name": "billing", "wait": 0.0}), ("disconnect", {"name": "orders"}),
        ("reconnect", {"name": "orders"}), ("renew", {"name": "orders"}),
        ("connect", {"all": True, "wait": 0.0}),                            # every cluster, as connect --all
        ("creds", {"name": "orders", "field": "url"})]
    assert app.opened == ["mysql://v-orders-1@127.0.0.1:13306/app", "/tmp/config.toml"]
    assert app.shown == [("dbtunneld: billing", "billing (127.0.0.1:13307): stopped")]   # Show details…


def test_copy_marks_only_the_password_secret_and_uses_the_configured_delay(daemon):
    app = make_app(daemon)
    app.run_action(("copy", "orders", "password"))
    app.run_action(("copy", "orders", "username"))
    assert app.board.copies == [(PASSWORD, True, 7), ("v-orders-1", False, 7)]


@pytest.mark.parametrize("answer,copied,notified", [(True, 1, 0), (False, 0, 0), (None, 0, 1)])
def test_production_password_asks_first(daemon, answer, copied, notified):
    questions = []
    app = make_app(daemon, confirm=lambda q: questions.append(q) or answer)
    app.run_action(("confirm_copy", "billing", "password"))
    assert "PRODUCTION cluster billing" in questions[0]
    assert len(app.board.copies) == copied
    assert len(app.shown) == notified
    if notified:
        assert "dbtunneld creds billing --copy" in app.shown[0][1]


def test_failures_become_one_notification_not_a_crash(daemon):
    app = make_app(daemon)
    app.client = Client(daemon.paths.socket_path.with_name("nothing.sock"))
    app.run_action(("copy", "orders", "password"))
    assert len(app.shown) == 1 and "copy failed" in app.shown[0][0] and "no dbtunneld daemon" in app.shown[0][1]
    assert PASSWORD not in repr(app.shown)


def test_sign_in_opens_the_browser_and_quit_all_stops_the_daemon(daemon):
    stopped = []
    app = make_app(daemon, stop_ui=lambda: stopped.append(True))
    app.run_action(("sign_in",))
    assert app.opened == ["http://127.0.0.1:1/device?code=ABCD"]
    app.run_action(("quit_all",))
    assert daemon.commands()[-1] == ("stop", {}) and stopped == [True]


def test_start_at_login_toggles_the_real_setting(daemon):
    state = {"on": False}
    app = make_app(daemon)
    app._read_autostart = lambda: state["on"]
    app._set_autostart = lambda enabled: state.update(on=enabled)
    app.run_action(("set_autostart", True))
    assert state["on"] and app.models[-1].find("Start at login").checked is True


def configured_paths(home: Path):
    """Paths whose config file exists (without one the tray offers "Set up…" instead: test_init_window)."""
    paths = default_paths({"DBTUNNELD_HOME": str(home / "dbt"), "HOME": str(home)})
    paths.config_file.parent.mkdir(parents=True, exist_ok=True)
    paths.config_file.touch()
    return paths


def test_daemon_loss_shows_start_daemon(home):
    paths = configured_paths(home)
    models = []
    app = tray_app.TrayApp(Client(paths.socket_path), paths=paths, ui=UiSettings(), submit=models.append,
                       notifier=Notifier(None), start_daemon=lambda: Client(paths.socket_path),
                       autostart=lambda: None)
    app.start()
    try:
        model = wait_for(lambda: models and not app.connecting and models[-1], 10, "the no-daemon menu")
        assert model.find("Start daemon").action == ("start_daemon",)
        assert "no dbtunneld daemon is listening" in model.items[1].text
    finally:
        app.stop()


# ----------------------------------------------------------------------------- the real tray

def tray_env(desktop: Desktop, home: Path, **extra) -> dict[str, str]:
    env = dict(desktop.env, DBTUNNELD_HOME=str(home / "dbt"), PYTHONUNBUFFERED="1")
    env.pop("PYSTRAY_BACKEND", None)
    env.update(extra)
    return env


def start_tray(desktop: Desktop, env: dict[str, str]) -> subprocess.Popen:
    return desktop.spawn("tray", [sys.executable, "-m", "dbtunneld", "tray"], env=env)


def run_tray_until_exit(env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dbtunneld", "tray"], env=env, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_tray_without_a_display_exits_with_a_message(home):
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.update(HOME=str(home), DBTUNNELD_HOME=str(home / "dbt"))
    done = run_tray_until_exit(env)
    assert done.returncode == tray.EXIT_NO_DESKTOP
    assert "no display" in done.stderr and "hint:" in done.stderr


@pytest.mark.tray
@pytest.mark.skipif(bool(missing_tools(("Xvfb",))), reason="needs Xvfb (Debian: xvfb)")
def test_tray_without_a_session_bus_exits_with_a_message(home):
    d = Desktop(home)
    try:
        d.start_x()
        env = tray_env(d, home)
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        done = run_tray_until_exit(env)
        assert done.returncode == tray.EXIT_NO_DESKTOP
        assert "no D-Bus session bus" in done.stderr and "dbus-run-session" in done.stderr
    finally:
        d.stop()


@pytest.mark.tray
@pytest.mark.skipif(bool(missing_tools(("Xvfb",))), reason="needs Xvfb (Debian: xvfb)")
def test_tray_with_a_bus_that_never_answers_exits_instead_of_hanging(home):
    """A socket that accepts but never speaks D-Bus: the guard around icon.run() ends the tray."""
    d = Desktop(home)
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(str(home / "silent-bus"))
    silent.listen(8)
    try:
        d.start_x()
        env = tray_env(d, home, DBUS_SESSION_BUS_ADDRESS=f"unix:path={home / 'silent-bus'}",
                       DBTUNNELD_TRAY_READY_TIMEOUT="3")
        done = run_tray_until_exit(env, timeout=60)
        assert done.returncode == tray.EXIT_NO_DESKTOP, done.stderr[-2000:]
        assert "did not start within 3 s" in done.stderr or "the tray stopped" in done.stderr
    finally:
        silent.close()
        d.stop()


# -- driving the real menu

def icon_geometry(desktop: Desktop) -> tuple[int, int, int, int] | None:
    found = desktop.run(["xdotool", "search", "--onlyvisible", "--name", "^dbtunneld: "]).stdout.split()
    for wid in found:
        out = desktop.run(["xdotool", "getwindowgeometry", "--shell", wid]).stdout.decode()
        geo = dict(line.split("=", 1) for line in out.split() if "=" in line)
        if int(geo.get("WIDTH", 0)) >= 8 and int(geo.get("Y", -1)) >= 0:
            return int(geo["X"]), int(geo["Y"]), int(geo["WIDTH"]), int(geo["HEIGHT"])
    return None


def popup_menus(desktop: Desktop) -> list[tuple[int, int, int, int]]:
    """Viewable override-redirect windows big enough to be menus, as (x, y, w, h)."""
    from Xlib import X, display as xdisplay

    d = xdisplay.Display(desktop.display)
    try:
        found = []
        for w in d.screen().root.query_tree().children:
            attrs = w.get_attributes()
            if attrs.map_state != X.IsViewable or not attrs.override_redirect:
                continue
            g = w.get_geometry()
            if g.width >= 100 and g.height >= 40:
                found.append((g.x, g.y, g.width, g.height))
        return found
    finally:
        d.close()


def keyboard_steps(items, text: str) -> int:
    """How many Down presses reach the item starting with ``text`` (GTK skips separators and greyed items)."""
    live = [i for i in items if not i.separator and i.enabled]
    return 1 + next(n for n, i in enumerate(live) if i.text.startswith(text))


def highlighted_row(image, box) -> tuple[int, int] | None:
    """Centre of the highlighted (selected) row inside a menu window, found by its colour."""
    x, y, w, h = box
    crop = image.convert("RGB").crop((x, y, x + w, y + h))
    rows = [yy for yy in range(h)
            if sum(1 for xx in range(0, w, 4) if _selected(crop.getpixel((xx, yy)))) > (w // 4) * 0.6]
    return (x + w // 2, y + (rows[0] + rows[-1]) // 2) if rows else None


def _selected(px) -> bool:
    r, g, b = px
    return b > 150 and b - r > 80


def clipboard_text(desktop: Desktop) -> str | None:
    done = desktop.run(["xclip", "-o", "-selection", "clipboard"])
    return done.stdout.decode() if done.returncode == 0 else None


def choose(d: Desktop, icon, button: str, status: DaemonStatus, path: tuple[str, str], shot: Path | None = None) -> None:
    """Open the tray menu, walk to path = (cluster entry, submenu item) with the keyboard, click it."""
    from PIL import Image

    from dbtunneld.ui.menu import ClockReading, build_menu

    before = set(popup_menus(d))
    x, y, w, h = icon
    d.run(["xdotool", "mousemove", str(x + w // 2), str(y + h // 2), "click", button], check=True)
    try:
        main = wait_for(lambda: [m for m in popup_menus(d) if m not in before], 10, "the menu to open")[0]
    except TimeoutError:
        d.screenshot(ARTIFACTS / "tray-menu-did-not-open.png")
        raise
    menu = build_menu(status, autostart=False, clock=ClockReading(time.time()))
    down = keyboard_steps(menu.items, path[0])
    sub_down = keyboard_steps(menu.find(path[0]).submenu, path[1])
    d.run(["xdotool", "key", *(["Down"] * down), "Right", *(["Down"] * (sub_down - 1))], check=True)
    submenu = wait_for(lambda: [m for m in popup_menus(d) if m not in before and m != main], 10,
                       "the cluster submenu")[0]
    path_png = shot or d.home / "menu.png"
    cx, cy = wait_for(lambda: highlighted_row(Image.open(d.screenshot(path_png)), submenu), 10,
                      f"{path[1]!r} to be highlighted in the submenu", interval=0.2)
    d.run(["xdotool", "mousemove", str(cx), str(cy), "click", "1"], check=True)
    wait_for(lambda: not [m for m in popup_menus(d) if m not in before], 10, "the menu to close")


def write_config(home: Path, clear_seconds: float) -> None:
    (home / "dbt").mkdir(exist_ok=True)
    (home / "dbt" / "config.toml").write_text(textwrap.dedent(f"""
        [vault]
        address = "http://127.0.0.1:8200"
        role = "dev"
        [bastion]
        transport = "ssh"
        host = "127.0.0.1"
        [ui]
        clipboard_clear_seconds = {clear_seconds}
        [[clusters]]
        name = "orders"
        endpoint = "127.0.0.1"
        db_role = "orders-ro"
        local_port = 13306
    """))


@pytest.mark.tray
@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (Debian: xvfb dbus trayer xdotool xclip imagemagick)")
@pytest.mark.parametrize("backend,button", [("gtk", "3")])
def test_real_tray_copy_password_then_cleared(home, daemon, backend, button):
    pytest.importorskip("gi", reason="needs PyGObject (the tray extra)")
    write_config(home, clear_seconds=3)
    d = Desktop(home)
    proc = None
    try:
        d.start_x().start_bus().start_tray_host()
        proc = start_tray(d, tray_env(d, home, PYSTRAY_BACKEND=backend))
        icon = wait_for(lambda: proc.poll() is None and icon_geometry(d), 30,
                        f"the tray icon to appear (tray log: {home / 'tray.log'})")
        assert d.run(["xdotool", "search", "--onlyvisible", "--name", "^dbtunneld: 1/2 up, 1 off$"]).stdout.strip()

        choose(d, icon, button, daemon.status, ("● orders", "Copy password"),
               shot=ARTIFACTS / f"tray-menu-{backend}.png")
        assert wait_for(lambda: clipboard_text(d) == PASSWORD, 10, "the password on the clipboard")
        print("TRAYLOGS", [(p, p.read_text(errors="replace")[-3000:]) for p in home.rglob("*") if p.is_file() and p.suffix in (".log", ".stderr")])
        assert ("creds", {"name": "orders", "field": "password"}) in daemon.calls
        targets = d.run(["xclip", "-o", "-selection", "clipboard", "-t", "TARGETS"]).stdout.decode().split()
        assert "x-kde-passwordManagerHint" in targets
        wait_for(lambda: clipboard_text(d) is None, 15, "the clipboard to be cleared")
        assert proc.poll() is None, "the tray must keep running"
        logs = "".join(p.read_text(errors="replace") for p in home.rglob("*.log"))
        assert PASSWORD not in logs, "the password leaked into a log"
    finally:
        if proc is not None:
            stop_pid(proc)
        d.stop()
    assert not d.alive()


def test_start_daemon_from_the_menu_reconnects_at_once(home):
    from dbtunneld.process.client import DaemonStartError

    paths = configured_paths(home)
    servers, models = [], []

    def start_daemon():
        if not servers:
            servers.append(None)
            raise DaemonStartError("the daemon exited with code 2: config.toml: file not found")
        servers.append(control.ControlServer(paths.socket_path, ScriptedDaemon()).start())
        return Client(paths.socket_path)

    app = tray_app.TrayApp(Client(paths.socket_path), paths=paths, ui=UiSettings(), submit=models.append,
                       notifier=Notifier(None), start_daemon=start_daemon, autostart=lambda: None)
    app.start()
    try:
        model = wait_for(lambda: models and not app.connecting and models[-1], 10, "the no-daemon menu")
        assert "config.toml: file not found" in model.items[1].text
        app.run_action(("start_daemon",))
        wait_for(lambda: app.status is not None, 5, "the status after starting the daemon (no backoff wait)")
        assert models[-1].health is Health.PARTIAL          # orders up, billing turned off
    finally:
        app.stop()
        for s in servers[1:]:
            s.close()


# -- the real tray on the real daemon and the sandbox stack

SIGN_IN = """
import sys, time
from dbtunneld.adapters.aws import AwsSession
from dbtunneld.adapters.sso import SsoDeviceLogin
from dbtunneld.core.config import load_config
login = SsoDeviceLogin(AwsSession(load_config(sys.argv[1]).aws))
auth = login.start()
deadline = time.monotonic() + 30
while not login.poll(auth, auth.interval).done:
    assert time.monotonic() < deadline, "sign-in not approved"
    time.sleep(0.1)
"""


def sign_in(stack) -> None:
    if stack.sso_cache_file().exists():
        return
    stack.sso.auto_approve(True)
    subprocess.run([sys.executable, "-c", SIGN_IN, stack.config_file], env=stack.env(), check=True, timeout=60)


def daemon_status(client: Client) -> DaemonStatus | None:
    try:
        return DaemonStatus.from_dict(client.request("status", timeout=5))
    except Exception as exc:
        daemon_status.last_error = repr(exc)
        return None


def mysql_login(port: int, user: str, password: str, database: str) -> int:
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=port, user=user, password=password, database=database,
                           connect_timeout=10)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone()[0]
    finally:
        conn.close()


def stop_daemon(client: Client, pid: int | None) -> None:
    try:
        client.request("stop", timeout=10)
    except Exception:
        pass
    if pid:
        try:
            wait_for(lambda: not Path(f"/proc/{pid}").exists() or "Z" in _proc_state(pid), 30, "the daemon to stop")
        except TimeoutError:
            os.kill(pid, 9)


def print_log_tails(home: Path, lines: int = 30) -> None:
    for path in sorted(home.rglob("*")):
        if path.is_file() and (path.suffix == ".log" or path.name.endswith(".stderr")):
            tail = path.read_text(errors="replace").splitlines()[-lines:]
            print(f"--- {path.relative_to(home)}\n" + "\n".join(tail))


def _proc_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.tray
@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (Debian: xvfb dbus trayer xdotool xclip imagemagick)")
def test_real_tray_on_the_daemon_and_the_sandbox(stack):
    """`dbtunneld tray` starts the daemon, connects "orders" from the menu, copies that lease's
    password (it logs into MariaDB through the tunnel), clears it, and a killed tray drops no tunnel."""
    pytest.importorskip("gi", reason="needs PyGObject (the tray extra)")
    sign_in(stack)
    home = short_home("dbt-tray-e2e-")
    config = home / "config.toml"
    config.write_text(Path(stack.config_file).read_text() + "\n[ui]\nclipboard_clear_seconds = 3\n")
    d = Desktop(home)
    paths = default_paths({"DBTUNNELD_HOME": str(home / "dbt"), "HOME": stack.home})
    client, proc, daemon_pid = Client(paths.socket_path), None, None
    orders = stack.clusters["orders"]
    try:
        d.start_x().start_bus().start_tray_host()
        env = stack.env(DBTUNNELD_HOME=str(home / "dbt"), PYTHONUNBUFFERED="1", DBTUNNELD_KEYRING="memory",
                        **{k: v for k, v in d.env.items() if k in ("DISPLAY", "DBUS_SESSION_BUS_ADDRESS",
                                                                   "XDG_RUNTIME_DIR", "NO_AT_BRIDGE",
                                                                   "GSETTINGS_BACKEND", "GDK_BACKEND")})
        env.pop("PYSTRAY_BACKEND", None)
        proc = d.spawn("tray", [sys.executable, "-m", "dbtunneld", "--config", str(config), "tray"], env=env)

        status = wait_for(lambda: daemon_status(client), 60, "the tray to start the daemon")  # noqa
        daemon_pid = status.pid
        assert daemon_pid != proc.pid
        icon = wait_for(lambda: proc.poll() is None and icon_geometry(d), 30, "the tray icon")
        wait_for(lambda: d.run(["xdotool", "search", "--onlyvisible", "--name", "^dbtunneld: 0/2 up"]).stdout, 30,
                 "the tooltip to show the daemon's status")
        button = "1" if tray_desktop.choose_backend({}) == "appindicator" else "3"

        choose(d, icon, button, daemon_status(client), ("○ orders", "Connect"))
        up = wait_for(lambda: (s := daemon_status(client)) and any(
            t.name == "orders" and t.state == T.UP and t.username for t in s.tunnels) and s, 60, "orders to be up")
        user = next(t.username for t in up.tunnels if t.name == "orders")
        wait_for(lambda: d.run(["xdotool", "search", "--onlyvisible", "--name", "^dbtunneld: 1/2 up"]).stdout, 30,
                 "the tray to show orders up")

        choose(d, icon, button, up, ("● orders", "Copy password"), shot=ARTIFACTS / "tray-menu-sandbox.png")
        password = wait_for(lambda: clipboard_text(d), 10, "the password on the clipboard")
        local_user = client.request("creds", name="orders")["username"]              # login = "local"
        assert mysql_login(orders.local_port, local_user, password, orders.database) == 1   # the stable pair
        wait_for(lambda: clipboard_text(d) is None, 15, "the clipboard to be cleared")

        proc.kill()                                           # a tray crash...
        proc.wait(10)
        assert mysql_login(orders.local_port, local_user, password, orders.database) == 1   # ...drops no tunnel
        assert daemon_status(client).pid == daemon_pid
        logs = "".join(p.read_text(errors="replace") for p in home.rglob("*.log"))
        assert password not in logs, "the password leaked into a log"
        assert "CRITICAL" not in (home / "tray.log").read_text(errors="replace"), "GTK warned at start"
    finally:
        if proc is not None:
            stop_pid(proc)
        stop_daemon(client, daemon_pid)
        d.stop()
        print_log_tails(home)                                 # shown by pytest when the test fails
        import shutil

        shutil.rmtree(home, ignore_errors=True)
    assert user not in stack.dynamic_users("orders"), "the daemon revokes the lease when it stops"


def test_menu_model_maps_onto_pystray_items(monkeypatch):
    """Texts, enabled and checked flags, separators and submenus reach pystray; a click sends the action."""
    monkeypatch.setenv("PYSTRAY_BACKEND", "dummy")             # pystray's Menu/MenuItem need no display
    import pystray

    from dbtunneld.ui.menu import ClockReading, build_menu

    model = build_menu(scripted_status(), autostart=True, clock=ClockReading(time.time()))
    clicked = []
    menu = tray_pystray.to_pystray_menu(pystray, model.items, clicked.append)
    items = list(menu.items)
    assert [i.text for i in items if i is not pystray.Menu.SEPARATOR] == [
        i.text for i in model.items if not i.separator]
    assert sum(i is pystray.Menu.SEPARATOR for i in items) == sum(i.separator for i in model.items)
    by_text = {i.text: i for i in items if i is not pystray.Menu.SEPARATOR}
    assert by_text["Start at login"].checked is True
    assert by_text["Open config"].checked is None
    assert not by_text[model.items[0].text].enabled                        # the AWS line is information
    orders = next(i for t, i in by_text.items() if t.startswith("● orders"))
    sub = {i.text: i for i in orders.submenu.items if i is not pystray.Menu.SEPARATOR}
    sub["Copy password"](None)
    by_text["Quit (tray only)"](None)
    assert clicked == [("copy", "orders", "password"), ("quit",)]


def test_private_icon_dir_sweeps_dead_trays_only(tmp_path):
    from dbtunneld.ui.tray import private_icon_dir

    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / "tray-tmp" / str(dead.pid)
    stale.mkdir(parents=True)
    (stale / "tmpicon").write_bytes(b"png")
    alive = tmp_path / "tray-tmp" / str(os.getppid())
    alive.mkdir()
    mine = private_icon_dir(tmp_path)
    assert mine == tmp_path / "tray-tmp" / str(os.getpid()) and mine.is_dir()
    assert not stale.exists() and alive.exists()
    assert (mine.stat().st_mode & 0o777) == 0o700


# ----------------------------------------------------------------------------- macOS, on fake AppKit

def run_mac_tray(daemon, driver) -> object:
    """The real TrayRunner on pystray's real darwin backend over fake AppKit (tests/helpers/macfakes),
    its run loop on this (the main) thread; ``driver(runner, AppKit)`` plays the user on another
    thread. Returns the fakes' record of AppKit calls."""
    from helpers import macos

    with macos.installed() as cocoa:
        import AppKit

        from dbtunneld.ui.clipboard import MacClipboard

        runner = tray_pystray.TrayRunner(macos.darwin_pystray(), "darwin", daemon.paths, daemon.paths.config_file,
                                 UiSettings(clipboard_clear_seconds=60), ready_timeout=30)
        runner.app._clipboard_factory = MacClipboard
        nsapp = AppKit.NSApplication.sharedApplication()
        failure: list[BaseException] = []

        def drive():
            try:
                driver(runner, AppKit)
            except BaseException as exc:
                failure.append(exc)
            finally:                                                # the loop ends even on failure
                from PyObjCTools import AppHelper

                AppHelper.callAfter(runner.icon.stop)
                AppHelper.callAfter(nsapp.terminate_, None)

        threading.Thread(target=drive, name="test-user", daemon=True).start()
        assert runner.run() == 0
        if failure:
            raise failure[0]
        return cocoa


def main_thread(fn) -> None:
    from PyObjCTools import AppHelper

    AppHelper.callAfter(fn)


def mac_ready(runner) -> object:
    item = runner.icon._status_item
    wait_for(lambda: runner.funnel.applied is not None and not item._button.hidden and item.menu(), 10,
             "the icon to show with its menu")
    return item


def titles(menu) -> list[str]:
    return [i.title() for i in menu.itemArray()]


def test_mac_appkit_runs_on_the_main_thread_as_a_menu_bar_extra_with_a_template_icon(daemon):
    def user(runner, AppKit):
        session = AppKit.simulate_open_menu(mac_ready(runner))
        assert session.opened.wait(5)
        session.click("Quit (tray only)")
        assert session.finished.wait(5)

    cocoa = run_mac_tray(daemon, user)
    assert cocoa.violations == [], [f"{c.name} on {c.thread}" for c in cocoa.violations]
    assert cocoa.named("NSApplication.run")[0].args == (1,), "activation policy Accessory before run()"
    # shown once; hidden once, on the main thread, when the loop ended (not later by Icon.__del__
    # from whichever thread collects it)
    assert [(c.args, c.main) for c in cocoa.named("NSStatusBarButton.setHidden")] == [((False,), True),
                                                                                      ((True,), True)]
    ui_calls = [c for c in cocoa.calls if c.name.startswith(("NSStatus", "NSMenu", "NSApplication.stop"))]
    assert ui_calls and all(c.main for c in ui_calls)
    assert cocoa.named("NSApplication.stop")[0].main, "Quit stopped the run loop from the main thread"


def test_mac_icon_is_the_36px_template_at_18pt_marked_before_it_is_installed(daemon):
    seen = {}

    def user(runner, AppKit):
        item = mac_ready(runner)
        seen["installed"] = list(item._button.installed)
        runner.app.on_status(orders_failed(daemon.status))
        wait_for(lambda: len(item._button.installed) > len(seen["installed"]), 5, "the state icon to change")
        seen["installed"] = list(item._button.installed)
        main_thread(runner.app.do_quit)

    run_mac_tray(daemon, user)
    assert len(seen["installed"]) >= 2
    for image in seen["installed"]:
        assert image == {"points": (18.0, 18.0), "pixels": (36, 36), "template": True}


def orders_failed(st: DaemonStatus) -> DaemonStatus:
    import dataclasses

    return dataclasses.replace(st, tunnels=(dataclasses.replace(st.tunnels[0], state=T.FAILED, last_error="boom"),)
                               + st.tunnels[1:])


def signed_out(status: DaemonStatus) -> DaemonStatus:
    import dataclasses

    return dataclasses.replace(status, aws=dataclasses.replace(status.aws, state=C.NEEDS_SIGN_IN))


def test_mac_menu_replaced_while_open_still_runs_the_clicked_item(daemon):
    """The sign-in line appears above the clusters while the menu is open; the click on "Copy
    password" must copy the password (pystray maps clicks by position in the newest menu)."""
    got = {}

    def user(runner, AppKit):
        item = mac_ready(runner)
        board = AppKit.NSPasteboard.generalPasteboard()
        session = AppKit.simulate_open_menu(item)
        assert session.opened.wait(5)
        orders = next(t for t in titles(item.menu()) if t.startswith("● orders"))
        runner.app.on_status(signed_out(daemon.status))             # a status event while it is open
        applied = threading.Event()
        main_thread(applied.set)                # runs after the funnel's update
        assert applied.wait(5)
        session.click(orders, "Copy password")
        assert session.finished.wait(5)
        wait_for(lambda: board.stringForType_(AppKit.NSPasteboardTypeString), 10, "the copy")
        got["copied"] = board.stringForType_(AppKit.NSPasteboardTypeString)
        wait_for(lambda: "Sign in…" in titles(item.menu()), 5, "the held update after the menu closed")
        main_thread(runner.app.do_quit)

    cocoa = run_mac_tray(daemon, user)
    assert got["copied"] == PASSWORD
    assert cocoa.violations == []


def test_mac_ctrl_c_clears_the_copied_password_before_the_process_exits(daemon):
    def user(runner, AppKit):
        import signal as signals

        from PyObjCTools import MachSignals

        item = mac_ready(runner)
        board = AppKit.NSPasteboard.generalPasteboard()
        session = AppKit.simulate_open_menu(item)
        assert session.opened.wait(5)
        session.click(next(t for t in titles(item.menu()) if t.startswith("● orders")), "Copy password")
        wait_for(lambda: board.stringForType_(AppKit.NSPasteboardTypeString) == PASSWORD, 10, "the copy")
        handler = MachSignals.getsignal(signals.SIGINT)              # pystray's: terminate:
        main_thread(lambda: handler(signals.SIGINT))

    cocoa = run_mac_tray(daemon, user)
    names = [c.name for c in cocoa.calls]
    exit_at = names.index("process.exit")
    clears = [i for i, n in enumerate(names) if n == "NSPasteboard.clearContents"]
    assert len(clears) == 2 and clears[-1] < exit_at, "copied, then cleared before terminate: exits"


def test_a_second_tray_is_refused_with_the_pid_of_the_first(home):
    paths = default_paths({"DBTUNNELD_HOME": str(home / "dbt"), "HOME": str(home)})
    first = tray.hold_tray_lock(paths)
    try:
        env = {**os.environ, "DBTUNNELD_HOME": str(home / "dbt"), "HOME": str(home), "PYSTRAY_BACKEND": "darwin",
               "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests" / "helpers" / "macfakes")])}
        out = subprocess.run([sys.executable, "-m", "dbtunneld", "tray"], env=env, capture_output=True, text=True,
                             timeout=60)
    finally:
        first.release()
    assert out.returncode == 1
    assert f"a dbtunneld tray is already running (pid {os.getpid()})" in out.stderr
    tray.hold_tray_lock(paths).release()                            # free again once the first quits


# -- screenshots of each state (test-artifacts/tray-state-*.png)

def _state_statuses(now: float) -> dict[str, DaemonStatus]:
    base = scripted_status(now)
    orders, billing = base.tunnels
    up_billing = TunnelStatus("billing", 13307, T.UP, since=now - 60, username="v-billing-1", production=True)
    long_error = ("ssm: StartSession for i-0123456789abcdef0 failed: TargetNotConnected: the target is not "
                  "connected to Session Manager (its agent has not reported in the last 5 minutes)")
    return {
        "all-up": replace(base, tunnels=(orders, up_billing)),
        "one-turned-off": base,
        "reconnecting": replace(base, tunnels=(replace(orders, state=T.RECONNECTING, since=now - 3), up_billing)),
        "failed-long-error": replace(base, tunnels=(
            TunnelStatus("orders", 13306, T.FAILED, since=now - 30, last_error=long_error,
                         hint="start the SSM agent on the bastion, or check bastion.tags in config.toml"), up_billing)),
        "sign-in-needed": replace(base, aws=replace(base.aws, state=C.NEEDS_SIGN_IN),
                                  tunnels=(replace(orders, state=T.NEEDS_SIGN_IN, username=""), billing)),
        "writer-read-only": replace(base, tunnels=(replace(orders, role="reader", expected_role="writer"), up_billing)),
    }


@pytest.mark.tray
@pytest.mark.skipif(bool(MISSING), reason=f"needs {', '.join(MISSING)} (Debian: xvfb dbus trayer xdotool xclip imagemagick)")
def test_screenshots_of_each_state(home, daemon):
    """The real tray (GTK) on each state: icon, tooltip, the menu and the first cluster's submenu.
    A long error keeps the submenu narrow (wrapped, with "Show details…")."""
    import re

    from dbtunneld.ui.menu import ClockReading, build_menu

    pytest.importorskip("gi", reason="needs PyGObject (the tray extra)")
    write_config(home, clear_seconds=30)
    d = Desktop(home)
    widths = {}
    try:
        d.start_x().start_bus().start_tray_host()
        for name, status in _state_statuses(time.time()).items():
            daemon.status = status
            model = build_menu(status, autostart=False, clock=ClockReading(time.time()))
            proc = start_tray(d, tray_env(d, home, PYSTRAY_BACKEND="gtk"))
            try:
                wait_for(lambda: d.run(["xdotool", "search", "--onlyvisible", "--name",
                                        "^" + re.escape(model.tooltip) + "$"]).stdout, 30, f"the {name} tooltip")
                icon = wait_for(lambda: icon_geometry(d), 10, "the icon")
                before = set(popup_menus(d))
                x, y, w, h = icon
                d.run(["xdotool", "mousemove", str(x + w // 2), str(y + h // 2), "click", "3"], check=True)
                main = wait_for(lambda: [m for m in popup_menus(d) if m not in before], 10, "the menu")[0]
                first = next(i for i in model.items if i.submenu)
                d.run(["xdotool", "key", *(["Down"] * keyboard_steps(model.items, first.text)), "Right"], check=True)
                sub = wait_for(lambda: [m for m in popup_menus(d) if m not in before and m != main], 10, "the submenu")[0]
                time.sleep(0.3)
                d.screenshot(ARTIFACTS / f"tray-state-{name}.png")
                widths[name] = sub[2]
                d.run(["xdotool", "key", "Escape", "Escape"])
            finally:
                stop_pid(proc)
    finally:
        d.stop()
    assert set(widths) == set(_state_statuses(time.time()))
    assert widths["failed-long-error"] < 420, widths          # was ~600 px before wrapping
    for name in widths:
        assert (ARTIFACTS / f"tray-state-{name}.png").stat().st_size > 0


@pytest.mark.parametrize("answer,requested", [(True, True), (False, False), (None, False)])
def test_reset_local_password_asks_then_requests(daemon, answer, requested):
    questions = []
    app = make_app(daemon, confirm=lambda q: questions.append(q) or answer)
    app.run_action(("reset_password", "orders"))
    assert "new local password for orders" in questions[0].lower() and "open sessions go on" in questions[0]
    assert (("reset_password", {"name": "orders"}) in daemon.commands()) is requested
