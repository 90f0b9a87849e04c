"""The first-run window (`dbtunneld init --gui`) under Xvfb, driven with xdotool as a user would:
from no config to a config `dbtunneld config check` accepts and a daemon it started, on the
sandbox stack (SSO stand-in, OpenBao behind the aws-auth stand-in, moto, the SSM stand-in).
The sign-in code is read off the window and approved at the SSO stand-in, as a user confirms it
in the browser. A screenshot of every page goes to test-artifacts/init-window-NN-*.png.

The tray's side: with no config, the menu offers "Set up…" first and picking it opens the window.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from dbtunneld.core.config import UiSettings
from dbtunneld.core.paths import default_paths
from dbtunneld.process.client import Client
from dbtunneld.sandbox.daemonproc import DaemonUnderTest
from dbtunneld.ui import tray_app
from dbtunneld.ui.notify import Notifier

from helpers.xsession import desktop, missing_tools, stop_pid, wait_for

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
MISSING = missing_tools(("Xvfb", "xdotool", "import"))
pytestmark = pytest.mark.skipif(bool(MISSING), reason=f"missing {', '.join(MISSING)}")
TITLE = "dbtunneld setup - "


def screen(root: Path):
    """A private Xvfb (no window manager: the window is driven by its keyboard focus)."""
    root.mkdir(parents=True, exist_ok=True)
    return desktop(root, bus=False)


def window_title(d) -> str:
    """The setup window's title ("" while it has none)."""
    found = d.run(["xdotool", "search", "--name", "^dbtunneld setup"]).stdout.split()
    for wid in found:
        name = d.run(["xdotool", "getwindowname", wid]).stdout.decode().strip()
        if name.startswith(TITLE):
            return name
    return ""


def window_id(d) -> str:
    return d.run(["xdotool", "search", "--name", "^dbtunneld setup - "]).stdout.split()[0].decode()


def answer(d, text: str | None = None, keys: tuple[str, ...] = ()) -> None:
    """Type ``text`` (replacing the selected proposal) and/or press ``keys``, then Return."""
    d.run(["xdotool", "windowfocus", "--sync", window_id(d)], check=True)
    if text is not None:
        d.run(["xdotool", "type", "--delay", "5", text], check=True, timeout=30)
    d.run(["xdotool", "key", *keys, "Return"], check=True)


def answers_for(stack) -> list[tuple[str, dict]]:
    """What the user does on each page, by the start of the question (after the step)."""
    return [("AWS profile", {}), ("AWS region", {}),
            ("Vault address", {"text": stack.vault_addr}),
            ("Vault AWS auth role", {"text": stack.vault_role}),
            ("Vault IAM server id", {"text": stack.server_id}),
            ("Vault aws auth mount", {"text": stack.auth_mount}),
            ("Vault database secrets mount", {}),
            ("Transport", {"keys": ("2",)}),                  # ssm-port-forward
            ("Bastion", {}),                                  # the Online one (proposed)
            ("Clusters to add", {}),                          # all ticked
            ("Vault database role for", {}), ("Local port for", {}),
            ("Vault database role for", {}), ("Local port for", {})]


def page(d, last: str, timeout: float = 90) -> str:
    return wait_for(lambda: (t := window_title(d)) and t != last and t, timeout, "the next page of the setup window",
                    interval=0.1)


def test_setup_window_from_empty_config_to_a_checked_config_and_a_running_daemon(stack, tmp_path):
    with DaemonUnderTest(stack, tmp_path) as dut, screen(tmp_path / "x") as d:
        dut.config_path.unlink()
        env = dict(dut.env, DISPLAY=d.display)
        proc = d.spawn("init-gui", [sys.executable, "-m", "dbtunneld", "init", "--gui", "--no-browser"], env=env)
        shots, last = 0, ""
        try:
            for question, action in [("AWS profile", {}), ("AWS region", {})]:
                last = page(d, last)
                assert last.split(": ", 1)[1].startswith(question), last
                shots += 1
                d.screenshot(ARTIFACTS / f"init-window-{shots:02d}-{question.split()[0].lower()}.png")
                answer(d, **action)
            last = page(d, last)                              # the sign-in: the code is on the page
            code = re.search(r"waiting for the code (\S+)", last)
            assert code, last
            shots += 1
            d.screenshot(ARTIFACTS / f"init-window-{shots:02d}-sign-in.png")
            assert stack.sso.approve(code.group(1))           # the user confirms it in the browser
            for question, action in answers_for(stack)[2:]:
                last = page(d, last)
                assert last.split(": ", 1)[1].startswith(question), last
                shots += 1
                d.screenshot(ARTIFACTS / f"init-window-{shots:02d}-{question.split()[0].lower()}.png")
                answer(d, **action)
            last = page(d, last, timeout=120)
            shots += 1
            d.screenshot(ARTIFACTS / f"init-window-{shots:02d}-done.png")
            assert last.startswith(TITLE + "Done: dbtunneld is running"), last
        except BaseException:
            d.screenshot(ARTIFACTS / "init-window-failed.png")
            print((d.home / "init-gui.log").read_text(errors="replace")[-3000:])
            raise
        finally:
            dut.adopt()                                       # the daemon the window started: stopped by pid
        doc = tomllib.loads(dut.config_path.read_text())
        assert {c["name"] for c in doc["clusters"]} == {"orders", "billing"}
        assert doc["bastion"] == {"transport": "ssm-port-forward", "tags": {"dbtunneld:role": "bastion"}}
        assert "ok (2 clusters)" in dut.cli("config", "check", str(dut.config_path)).stdout
        status = dut.status()
        assert {t["name"] for t in status["tunnels"]} == {"orders", "billing"}
        answer(d)                                             # Close
        assert proc.wait(15) == 0
        dut.wait_up(["orders"], timeout=90)                   # the window connected what it added


def test_tray_without_config_offers_set_up_and_opens_the_window(tmp_path):
    home = tmp_path
    paths = default_paths({"DBTUNNELD_HOME": str(home / "dbt"), "HOME": str(home)})
    models, launched = [], []
    (home / "aws-config").write_text("[profile dev]\nregion = eu-west-1\n")
    with screen(home / "x") as d:
        env = dict(d.env, DBTUNNELD_HOME=str(home / "dbt"), AWS_CONFIG_FILE=str(home / "aws-config"))

        def launch(argv):
            launched.append(argv)
            return d.spawn("setup-window", argv, env=env)

        app = tray_app.TrayApp(Client(paths.socket_path), paths=paths, ui=UiSettings(), submit=models.append,
                           notifier=Notifier(None), start_daemon=lambda: Client(paths.socket_path),
                           autostart=lambda: None, launch_setup=launch)
        app.first_run_setup = True
        app.start()                                           # no config: the window opens by itself
        try:
            model = wait_for(lambda: models and models[-1], 10, "a menu")
            assert model.items[1].text == "Set up…" and model.items[1].action == ("setup",)
            wait_for(lambda: launched, 10, "the launch of the setup window (on the action's own thread)")
            assert launched[0][-2:] == ["init", "--gui"] and str(paths.config_file) in launched[0]
            title = wait_for(lambda: window_title(d), 30, "the setup window")
            assert title == TITLE + "1. AWS profile: AWS profile", title
            d.screenshot(ARTIFACTS / "init-window-from-tray.png")
            app.dispatch(("setup",)).join(5)                  # picked again while open: no second window
            assert len(launched) == 1
        finally:
            app.stop()
            for name, p in d.procs:
                if name == "setup-window":
                    stop_pid(p)


def test_without_tkinter_init_gui_says_how_to_install_it(tmp_path):
    """No tkinter and no terminal emulator to fall back to: a message naming the packages and `dbtunneld init`."""
    code = ("import sys; sys.modules['tkinter'] = None; from dbtunneld.ui.cli import main; "
            "sys.exit(main(['--config', sys.argv[1], 'init', '--gui']))")
    env = dict(os.environ, PATH=str(tmp_path), HOME=str(tmp_path), DBTUNNELD_HOME=str(tmp_path / "dbt"))
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "config.toml")], env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 1, done.stderr
    assert "no tkinter" in done.stderr and "apt install python3-tk" in done.stderr
    assert "brew install python-tk" in done.stderr and "dbtunneld init" in done.stderr
    assert not (tmp_path / "config.toml").exists()


def test_pages_are_headed_by_the_wizard_step():
    from dbtunneld.ui.onboarding.window import step_of

    assert [step_of(q) for q in ("AWS profile", "Vault address", "Vault database role for orders", "Transport",
                                 "SSH user on the bastion", "Clusters to add", "Local port for orders")] == [
        "1. AWS profile", "3. Vault", "5. Clusters", "4. Bastion", "4. Bastion", "5. Clusters", "5. Clusters"]


@pytest.mark.tray
@pytest.mark.skipif(bool(missing_tools(("dbus-daemon", "trayer"))), reason="needs dbus-daemon and trayer")
def test_real_tray_without_config_opens_the_window_and_offers_set_up_first():
    """`dbtunneld tray` on an empty home: the setup window opens by itself, the icon says "not set up
    yet" and its menu starts with "Set up…" (screenshot: test-artifacts/tray-not-set-up.png)."""
    import shutil
    import signal
    import tempfile

    pytest.importorskip("gi", reason="needs PyGObject (the tray extra)")
    from helpers.xsession import Desktop, children_of
    from test_tray import icon_geometry, popup_menus

    home = Path(tempfile.mkdtemp(prefix="dbt-i19-", dir="/tmp"))     # short: Unix socket paths
    (home / "aws-config").write_text("[profile dev]\nregion = eu-west-1\n")
    d = Desktop(home)
    tray_proc = None
    try:
        d.start_x().start_bus().start_tray_host()
        env = dict(d.env, DBTUNNELD_HOME=str(home / "dbt"), AWS_CONFIG_FILE=str(home / "aws-config"),
                   PYSTRAY_BACKEND="gtk", PYTHONUNBUFFERED="1")
        tray_proc = d.spawn("tray", [sys.executable, "-m", "dbtunneld", "tray"], env=env)
        title = wait_for(lambda: window_title(d), 40, "the setup window the tray opens")
        assert title == TITLE + "1. AWS profile: AWS profile"
        wait_for(lambda: d.run(["xdotool", "search", "--onlyvisible", "--name", "^dbtunneld: not set up yet$"]).stdout,
                 30, "the tray's not-set-up tooltip")
        x, y, w, h = wait_for(lambda: icon_geometry(d), 10, "the icon")
        before = set(popup_menus(d))
        d.run(["xdotool", "mousemove", str(x + w // 2), str(y + h // 2), "click", "3"], check=True)
        wait_for(lambda: [m for m in popup_menus(d) if m not in before], 10, "the menu")
        d.screenshot(ARTIFACTS / "tray-not-set-up.png")
        d.run(["xdotool", "key", "Escape"])
    finally:
        if tray_proc is not None:
            for pid in children_of(tray_proc.pid):            # the window: its own process
                os.kill(pid, signal.SIGTERM)
        d.stop()
        shutil.rmtree(home, ignore_errors=True)


def test_a_wizard_error_ends_on_a_page_that_says_the_fix(tmp_path):
    """No profile in ~/.aws/config: the window's last page names the problem and the fix; exit 1."""
    (tmp_path / "aws-config").write_text("# no profile yet\n")
    with screen(tmp_path / "x") as d:
        env = dict(d.env, DBTUNNELD_HOME=str(tmp_path / "dbt"), AWS_CONFIG_FILE=str(tmp_path / "aws-config"))
        proc = d.spawn("init-gui", [sys.executable, "-m", "dbtunneld", "init", "--gui"], env=env)
        try:
            title = wait_for(lambda: window_title(d), 30, "the setup window")
            assert title == TITLE + "Setup stopped: ~/.aws/config has no profile", title
            d.screenshot(ARTIFACTS / "init-window-error.png")
            answer(d)                                         # Close
            assert proc.wait(15) == 1
        finally:
            stop_pid(proc)
    assert not (tmp_path / "dbt" / "config.toml").exists()
