"""Login items: real enable/disable on Linux into a private HOME (validated by desktop-file-validate,
systemd-analyze and systemctl itself), the macOS and Windows forms rendered and checked through
fakes of launchctl and winreg (named as fakes), and the quoting of every file format."""

from __future__ import annotations

import json
import os
import plistlib
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from dbtunneld.ui import autostart, autostart_launchd, autostart_systemd, autostart_xdg
from dbtunneld.ui.autostart import Autostart
from dbtunneld.ui.autostart_common import AutostartError, Ran, program_command
from dbtunneld.ui.autostart_launchd import LAUNCHD_LABEL
from dbtunneld.ui.autostart_systemd import UNIT_NAME, systemd_quote, systemd_split
from dbtunneld.ui.autostart_windows import APPROVED_KEY, RUN_KEY, RUN_VALUE, windows_command_line, windows_split
from dbtunneld.ui.autostart_xdg import desktop_exec_quote, desktop_exec_split

ROOT = Path(__file__).resolve().parents[1]
WEIRD = "in st$all 100%"  # a folder name that needs quoting in every format


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        pytest.skip(f"{tool} is not installed (./dev setup installs it)")
    return path


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A private login session: HOME, XDG_CONFIG_HOME, XDG_RUNTIME_DIR; no bus, no display."""
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    return {"HOME": str(tmp_path / "home"), "XDG_CONFIG_HOME": str(tmp_path / "home" / "cfg"),
            "XDG_RUNTIME_DIR": str(run), "DBTUNNELD_HOME": str(tmp_path / "dbt"),
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"}


def fake_install(root: Path, folder: str = WEIRD, name: str = "dbtunneld") -> Path:
    """A stand-in installed program (an executable script) inside a folder that needs quoting;
    returns the path of the interpreter next to it."""
    bindir = root / folder / "bin"
    bindir.mkdir(parents=True)
    prog = bindir / name
    prog.write_text("#!/bin/sh\nexit 0\n")
    prog.chmod(0o755)
    return bindir / "python"


@pytest.fixture
def linux(env: dict[str, str], tmp_path: Path) -> Autostart:
    return Autostart(platform="linux", env=env, executable=str(fake_install(tmp_path)))


def config_home(env: dict[str, str]) -> Path:
    return Path(env["XDG_CONFIG_HOME"])


def unit_path(env: dict[str, str]) -> Path:
    return config_home(env) / "systemd" / "user" / UNIT_NAME


def desktop_path(env: dict[str, str]) -> Path:
    return config_home(env) / "autostart" / "dbtunneld.desktop"


def wants_link(env: dict[str, str]) -> Path:
    return config_home(env) / "systemd" / "user" / "default.target.wants" / UNIT_NAME


# --- validators: the real tools ------------------------------------------------------------------


def desktop_problems(path: Path) -> str:
    r = subprocess.run([need("desktop-file-validate"), str(path)], capture_output=True, text=True,
                       timeout=30)
    out = r.stdout + r.stderr
    bad = [line for line in out.splitlines() if "error:" in line or "warning:" in line]
    return out if r.returncode != 0 or bad else ""


def unit_problems(path: Path, env: dict[str, str]) -> str:
    r = subprocess.run([need("systemd-analyze"), "--user", "verify", str(path)], env=env,
                       capture_output=True, text=True, timeout=60)
    return r.stdout + r.stderr if r.returncode != 0 or r.stderr.strip() else ""


def systemctl_is_enabled(env: dict[str, str]) -> str:
    r = subprocess.run([need("systemctl"), "--user", "is-enabled", UNIT_NAME], env=env,
                       capture_output=True, text=True, timeout=30)
    return r.stdout.strip()


def test_the_validators_catch_broken_files(tmp_path: Path, env: dict[str, str]) -> None:
    """Negative controls: the checks used below do fail on broken files."""
    bad_desktop = tmp_path / "bad.desktop"
    bad_desktop.write_text('[Desktop Entry]\nType=Application\nName=x\nExec="/a b/c tray\n')
    assert "quote" in desktop_problems(bad_desktop)
    bad_unit = tmp_path / "bad.service"
    bad_unit.write_text("[Service]\nType=notfy\nExecStart=/bin/true\n")
    assert "notfy" in unit_problems(bad_unit, env)
    missing_program = tmp_path / "missing.service"
    missing_program.write_text('[Service]\nExecStart="/no/such dir/dbtunneld" "daemon"\n')
    assert "not executable" in unit_problems(missing_program, env)


# --- Linux, for real, into a private HOME --------------------------------------------------------


def test_daemon_mode_writes_a_systemd_unit_that_verifies_and_systemctl_enables(
        linux: Autostart, env: dict[str, str], tmp_path: Path) -> None:
    change = linux.enable("daemon")
    program = str(tmp_path / WEIRD / "bin" / "dbtunneld")
    assert unit_problems(unit_path(env), env) == ""  # also proves ExecStart's quoting: it exists
    text = unit_path(env).read_text()
    # neither a bad config (the user fixes it) nor "another daemon runs" is retried
    from dbtunneld.process.daemon import EXIT_ALREADY_RUNNING, EXIT_CONFIG

    for line in ("Type=notify", "Restart=on-failure", "WantedBy=default.target",
                 f"RestartPreventExitStatus={EXIT_CONFIG} {EXIT_ALREADY_RUNNING}"):
        assert line in text.splitlines()
    assert wants_link(env).is_symlink() and systemctl_is_enabled(env) == "enabled"
    st_ = change.status
    assert (st_.enabled, st_.mechanism, st_.mode, st_.command) == (True, "systemd", "daemon",
                                                                    (program, "daemon"))
    assert st_.loaded is None  # no user manager runs here, so "active" cannot be known
    assert any("no systemd user manager" in n for n in change.notes)
    assert not Path(env["HOME"], ".config").exists()  # only the private XDG_CONFIG_HOME was used

    off = linux.disable()
    assert not unit_path(env).exists() and not wants_link(env).is_symlink()
    assert off.status.location is None and not linux.is_enabled()
    assert systemctl_is_enabled(env) != "enabled"


def test_tray_mode_writes_an_xdg_entry_that_validates(linux: Autostart, env: dict[str, str],
                                                      tmp_path: Path) -> None:
    change = linux.enable("tray")
    path = desktop_path(env)
    assert desktop_problems(path) == ""
    program = str(tmp_path / WEIRD / "bin" / "dbtunneld")
    assert change.status.enabled and change.status.command == (program, "tray")
    assert (change.status.mechanism, change.status.mode) == ("xdg", "tray")
    icon = next(line for line in path.read_text().splitlines() if line.startswith("Icon="))[5:]
    assert icon == autostart_xdg.FALLBACK_ICON or Path(icon).is_file()
    assert linux.disable().status.location is None and not path.exists()


def test_desktop_exec_parses_back_to_the_program_with_glib(env: dict[str, str],
                                                           tmp_path: Path) -> None:
    """GLib reads the entry the way GNOME's session does: the argv it gets is ours. (No "%" in
    this folder: GLib checks the program exists before it expands "%%".)"""
    gi = pytest.importorskip("gi")
    gi.require_version("Gio", "2.0")
    from gi.repository import Gio, GLib

    folder = 'a "quoted" $dir \\ with `ticks`'
    python = fake_install(tmp_path, folder)
    Autostart(platform="linux", env=env, executable=str(python)).enable("tray")
    info = Gio.DesktopAppInfo.new_from_filename(str(desktop_path(env)))
    assert info is not None, desktop_path(env).read_text()
    ok, argv = GLib.shell_parse_argv(info.get_commandline())
    assert ok and argv == [str(tmp_path / folder / "bin" / "dbtunneld"), "tray"]
    assert desktop_problems(desktop_path(env)) == ""


def test_never_both_enabling_one_mode_removes_the_other(linux: Autostart, env: dict[str, str]) -> None:
    linux.enable("daemon")
    change = linux.enable("tray")
    assert desktop_path(env).exists() and not unit_path(env).exists()
    assert not wants_link(env).is_symlink()
    assert any("never both" in n for n in change.notes)
    linux.enable("daemon")
    assert unit_path(env).exists() and not desktop_path(env).exists()
    assert systemctl_is_enabled(env) == "enabled"


def test_both_present_by_hand_is_reported_not_enabled(linux: Autostart, env: dict[str, str]) -> None:
    linux.enable("daemon")
    desktop_path(env).parent.mkdir(parents=True)
    desktop_path(env).write_text(autostart_xdg.render_desktop(["/bin/true", "tray"], "x"))
    st_ = linux.status()
    assert not st_.enabled and any("start twice" in p for p in st_.problems)


def test_status_reads_the_truth_not_a_flag(linux: Autostart, env: dict[str, str],
                                           tmp_path: Path) -> None:
    linux.enable("tray")
    (tmp_path / WEIRD / "bin" / "dbtunneld").unlink()  # uninstalled since
    st_ = linux.status()
    assert not st_.enabled and "does not exist" in st_.problems[0]

    desktop_path(env).write_text(desktop_path(env).read_text() + "Hidden=true\n")
    assert any("switched off" in p for p in linux.status().problems)

    desktop_path(env).unlink()
    unit_path(env).parent.mkdir(parents=True)
    unit_path(env).write_text(autostart_systemd.render_unit(["/bin/true", "daemon"]))  # written, not enabled
    st_ = linux.status()
    assert (st_.mechanism, st_.enabled) == ("systemd", False)
    assert "is-enabled" in st_.problems[0]


def test_a_program_path_systemd_would_refuse_is_an_error(env: dict[str, str],
                                                          tmp_path: Path) -> None:
    bad = Autostart(platform="linux", env=env, executable=str(fake_install(tmp_path, "it's")))
    with pytest.raises(AutostartError) as err:
        bad.enable("daemon")
    assert "systemd refuses" in err.value.message and "--mode tray" in err.value.hint
    assert not unit_path(env).exists()
    unit_path(env).parent.mkdir(parents=True)  # and systemd really does refuse it:
    unit_path(env).write_text(autostart_systemd.render_unit([str(tmp_path / "it's" / "bin" / "dbtunneld")]))
    assert "special characters" in unit_problems(unit_path(env), env)


def test_default_mode_is_tray_on_a_desktop_and_daemon_headless(env: dict[str, str]) -> None:
    assert Autostart(platform="linux", env=env).default_mode() == "daemon"
    assert Autostart(platform="linux", env={**env, "DISPLAY": ":1"}).default_mode() == "tray"
    assert Autostart(platform="darwin", env=env, run=FakeLaunchctl()).default_mode() == "tray"


def test_unknown_mode_is_refused_with_a_hint(linux: Autostart) -> None:
    with pytest.raises(AutostartError) as err:
        linux.enable("cron")
    assert "--mode" in err.value.hint


def test_module_api_for_the_tray_checkbox(monkeypatch: pytest.MonkeyPatch, env: dict[str, str],
                                          tmp_path: Path) -> None:
    for k in ("DISPLAY", "WAYLAND_DISPLAY", "DBUS_SESSION_BUS_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(sys, "platform", "linux")
    assert not autostart.is_enabled()
    change = autostart.enable("tray", start_now=False)
    assert change.status.enabled and autostart.is_enabled() and autostart.status().mode == "tray"
    assert not autostart.disable().status.enabled and not autostart.is_enabled()


def test_cli_enable_status_disable(env: dict[str, str], tmp_path: Path) -> None:
    exe = ROOT / ".venv" / "bin" / "dbtunneld"
    argv0 = [str(exe)] if exe.exists() else [sys.executable, "-m", "dbtunneld"]

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*argv0, "autostart", *args], env=env, capture_output=True, text=True,
                              timeout=60, cwd=tmp_path)

    on = cli("enable", "--mode", "daemon")
    assert on.returncode == 0, on.stderr
    assert f"wrote {unit_path(env)}" in on.stdout
    status = json.loads(cli("status", "--json").stdout)
    assert status["enabled"] and status["mode"] == "daemon" and status["problems"] == []
    assert Path(status["command"][0]).exists()  # points at an installed program
    off = cli("disable")
    assert off.returncode == 0 and "disabled (nothing starts at login)" in off.stdout
    assert cli("status").returncode == 0


# --- systemd with a user manager (fake systemctl) -------------------------------------------------


class FakeSystemctl:
    """Fake of `systemctl --user` with a running user manager: records calls, keeps enabled state."""

    def __init__(self, manager: bool = True, present: bool = True) -> None:
        self.calls: list[list[str]] = []
        self.manager, self.present, self.enabled, self.active = manager, present, False, False

    def __call__(self, argv, env) -> Ran:  # noqa: ANN001
        self.calls.append(list(argv))
        if not self.present:
            return Ran(127, "", "systemctl: not found")
        verb = argv[2]
        if verb == "is-system-running":
            return Ran(0, "running\n") if self.manager else Ran(1, "offline\n")
        if verb in ("enable", "disable"):
            self.enabled = verb == "enable"
            self.active = self.enabled if "--now" in argv else self.active
        if verb == "is-enabled":
            return Ran(0, "enabled\n") if self.enabled else Ran(1, "disabled\n")
        if verb == "is-active":
            return Ran(0, "active\n") if self.active else Ran(3, "inactive\n")
        return Ran(0)


def test_with_a_user_manager_enable_starts_it_now(env: dict[str, str], tmp_path: Path) -> None:
    fake = FakeSystemctl()
    auto = Autostart(platform="linux", env=env, run=fake, executable=str(fake_install(tmp_path)))
    assert auto.enable("daemon").status.loaded is False  # the default: only from the next login
    assert ["systemctl", "--user", "enable", UNIT_NAME] in fake.calls
    change = auto.enable("daemon", start_now=True)
    assert ["systemctl", "--user", "daemon-reload"] in fake.calls
    assert ["systemctl", "--user", "enable", "--now", UNIT_NAME] in fake.calls
    assert change.status.enabled and change.status.loaded is True
    auto.disable()
    assert ["systemctl", "--user", "disable", UNIT_NAME] in fake.calls
    assert fake.active  # unchecking "Start at login" keeps the daemon and its tunnels running
    auto.enable("daemon")
    auto.disable(stop_now=True)
    assert ["systemctl", "--user", "disable", "--now", UNIT_NAME] in fake.calls


def test_a_running_daemon_is_not_started_twice(env: dict[str, str], tmp_path: Path) -> None:
    sock_path = Path(env["DBTUNNELD_HOME"]) / "run" / "control.sock"
    sock_path.parent.mkdir(parents=True)
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(sock_path))
        listener.listen()
        fake = FakeSystemctl()
        auto = Autostart(platform="linux", env=env, run=fake, executable=str(fake_install(tmp_path)))
        change = auto.enable("daemon", start_now=True)
    assert ["systemctl", "--user", "enable", UNIT_NAME] in fake.calls
    assert not any("--now" in c for c in fake.calls)
    assert any("already running" in n for n in change.notes)


def test_without_systemctl_the_unit_is_written_and_status_says_why(env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    auto = Autostart(platform="linux", env=env, run=FakeSystemctl(present=False),
                     executable=str(fake_install(tmp_path)))
    change = auto.enable("daemon")
    assert unit_path(env).exists() and any("systemctl not found" in n for n in change.notes)
    assert not change.status.enabled and "systemctl not found" in change.status.problems[0]


# --- macOS: the plist, launchctl through a fake ---------------------------------------------------


class FakeClock:
    """Time for the bounded waits: ``sleep`` advances it at once."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


class FakeLaunchctl:
    """Fake of launchctl (gui/UID domain) that behaves like the real one for our verbs.

    ``bootout`` returns at once but launchd frees the label only when the process has exited
    (``exit_seconds`` later on ``clock``: the daemon revokes its leases on SIGTERM); until then
    `launchctl print` still shows the service and `bootstrap` fails with "Bootstrap failed: 5:
    Input/output error" (or 37, "Operation already in progress", when ``busy_rc`` says so), as
    reported for launchctl on macOS 11+ (launchctl(1): bootstrap/bootout; errno 5 EIO, 37 EALREADY).
    With ``print_hides_exiting`` `print` already says "Could not find service" while bootstrap is
    still refused (the case the bootstrap retry exists for).
    """

    def __init__(self, bootstrap_rc: int = 0, exit_seconds: float = 0.0, clock: FakeClock | None = None,
                 busy_rc: int = 5, print_hides_exiting: bool = False) -> None:
        self.calls: list[list[str]] = []
        self.loaded: set[str] = set()
        self.exiting: dict[str, float] = {}          # label -> when launchd frees it
        self.disabled: set[str] = set()
        self.bootstrap_rc = bootstrap_rc
        self.exit_seconds, self.clock, self.busy_rc = exit_seconds, clock or FakeClock(), busy_rc
        self.print_hides_exiting = print_hides_exiting

    def _held(self, label: str) -> bool:
        freed_at = self.exiting.get(label)
        if freed_at is not None and self.clock() >= freed_at:
            del self.exiting[label]
        return label in self.loaded or label in self.exiting

    def __call__(self, argv, env) -> Ran:  # noqa: ANN001
        self.calls.append(list(argv))
        verb, arg = argv[1], argv[2]
        label = arg.split("/")[-1]
        if verb == "bootstrap":
            data = plistlib.loads(Path(argv[3]).read_bytes())
            if self.bootstrap_rc:
                return Ran(self.bootstrap_rc, "", "Bootstrap failed: 5: Input/output error\n")
            if self._held(data["Label"]):
                msg = {5: "5: Input/output error", 37: "37: Operation already in progress"}[self.busy_rc]
                return Ran(self.busy_rc, "", f"Bootstrap failed: {msg}\n")
            self.loaded.add(data["Label"])
            return Ran(0)
        if verb == "bootout":
            gone = label in self.loaded
            self.loaded.discard(label)
            if gone and self.exit_seconds:
                self.exiting[label] = self.clock() + self.exit_seconds
            return Ran(0) if gone else Ran(3, "", "Boot-out failed: 3: No such process\n")
        if verb == "print":
            shown = label in self.loaded if self.print_hides_exiting else self._held(label)
            return Ran(0, f"{arg} = {{...}}\n") if shown else Ran(113, "", "Could not find service\n")
        if verb == "print-disabled":
            body = "".join(f'\t"{lb}" => disabled\n' for lb in sorted(self.disabled))
            return Ran(0, f"disabled services = {{\n{body}}}\n")
        if verb in ("enable", "disable"):
            (self.disabled.discard if verb == "enable" else self.disabled.add)(label)
        return Ran(0)


@pytest.fixture
def mac(env: dict[str, str], tmp_path: Path) -> tuple[Autostart, FakeLaunchctl]:
    fake = FakeLaunchctl()
    mac_env = {k: v for k, v in env.items() if k != "DBTUNNELD_HOME"}
    return Autostart(platform="darwin", env=mac_env, run=fake, uid=501,
                     executable=str(fake_install(tmp_path))), fake


def plist_path(env: dict[str, str]) -> Path:
    return Path(env["HOME"], "Library", "LaunchAgents", f"{LAUNCHD_LABEL}.plist")


def test_macos_plist_has_the_keys_and_loads(mac, env: dict[str, str], tmp_path: Path) -> None:  # noqa: ANN001
    auto, fake = mac
    change = auto.enable("tray", start_now=True)
    data = plistlib.loads(plist_path(env).read_bytes())
    assert data["Label"] == LAUNCHD_LABEL and data["RunAtLoad"] is True
    assert data["KeepAlive"] == {"SuccessfulExit": False}  # crash -> restart; clean quit -> stays off
    assert data["ProgramArguments"] == [str(tmp_path / WEIRD / "bin" / "dbtunneld"), "tray"]
    logs = Path(env["HOME"], "Library", "Logs", "dbtunneld")
    for key in ("StandardOutPath", "StandardErrorPath"):
        assert Path(data[key]).parent == logs
    assert logs.is_dir() and data["ProcessType"] == "Interactive"
    assert ["launchctl", "bootstrap", "gui/501", str(plist_path(env))] in fake.calls
    assert change.status.enabled and change.status.loaded is True
    assert change.status.mechanism == "launchd"


def test_macos_disable_removes_and_boots_out_only_when_asked(mac, env: dict[str, str]) -> None:  # noqa: ANN001
    auto, fake = mac
    assert auto.enable("daemon").status.loaded is False  # the default waits for the next login
    auto.enable("daemon", start_now=True)
    assert plistlib.loads(plist_path(env).read_bytes())["ProcessType"] == "Standard"  # not throttled
    off = auto.disable()
    assert not plist_path(env).exists() and off.status.location is None
    assert LAUNCHD_LABEL in fake.loaded  # the running copy (maybe the tray itself) keeps running
    auto.enable("tray", start_now=False)
    auto.disable(stop_now=True)
    assert ["launchctl", "bootout", f"gui/501/{LAUNCHD_LABEL}"] in fake.calls
    assert LAUNCHD_LABEL not in fake.loaded


def test_macos_status_sees_a_launchctl_disable_and_enable_clears_it(mac, env: dict[str, str]) -> None:  # noqa: ANN001
    auto, fake = mac
    auto.enable("tray")
    fake.disabled.add(LAUNCHD_LABEL)
    assert not auto.is_enabled() and "disabled in launchd" in auto.status().problems[0]
    assert auto.enable("tray").status.enabled


def test_macos_status_rejects_a_broken_plist(mac, env: dict[str, str]) -> None:  # noqa: ANN001
    auto, _ = mac
    auto.enable("tray", start_now=False)
    plist_path(env).write_text("<plist><dict><key>Label</key>")
    st_ = auto.status()
    assert not st_.enabled and "not a valid plist" in st_.problems[0]


def test_macos_bootstrap_failure_is_an_error_with_a_hint(env: dict[str, str], tmp_path: Path) -> None:
    clock = FakeClock()
    auto = Autostart(platform="darwin", env=env, run=FakeLaunchctl(bootstrap_rc=5, clock=clock), uid=501,
                     executable=str(fake_install(tmp_path)), clock=clock, sleep=clock.sleep)
    with pytest.raises(AutostartError) as err:
        auto.enable("tray", start_now=True)
    assert "Input/output error" in err.value.message and "launchctl print" in err.value.hint


@pytest.mark.parametrize("busy_rc", [5, 37])
def test_macos_enable_on_a_loaded_agent_waits_for_launchd_to_free_the_label(
        env: dict[str, str], tmp_path: Path, busy_rc: int) -> None:
    clock = FakeClock()
    fake = FakeLaunchctl(exit_seconds=4.0, clock=clock, busy_rc=busy_rc)
    mac_env = {k: v for k, v in env.items() if k != "DBTUNNELD_HOME"}
    auto = Autostart(platform="darwin", env=mac_env, run=fake, uid=501, executable=str(fake_install(tmp_path)),
                     clock=clock, sleep=clock.sleep)
    auto.enable("tray", start_now=True)
    started = clock.now
    change = auto.enable("daemon", start_now=True)         # already loaded: bootout, wait, bootstrap
    assert change.status.loaded is True and LAUNCHD_LABEL in fake.loaded
    assert 4.0 <= clock.now - started <= 4.0 + autostart_launchd.LAUNCHD_POLL
    assert [c[1] for c in fake.calls].count("bootstrap") == 2   # no failed attempt: it waited


@pytest.mark.parametrize("busy_rc", [5, 37])
def test_macos_bootstrap_busy_is_retried_until_the_label_is_free(
        env: dict[str, str], tmp_path: Path, busy_rc: int) -> None:
    clock = FakeClock()
    fake = FakeLaunchctl(clock=clock, busy_rc=busy_rc, exit_seconds=3.0, print_hides_exiting=True)
    mac_env = {k: v for k, v in env.items() if k != "DBTUNNELD_HOME"}
    auto = Autostart(platform="darwin", env=mac_env, run=fake, uid=501, executable=str(fake_install(tmp_path)),
                     clock=clock, sleep=clock.sleep)
    auto.enable("tray", start_now=True)
    fake.calls.clear()
    change = auto.enable("tray", start_now=True)
    assert change.status.loaded is True
    assert [c[1] for c in fake.calls].count("bootstrap") > 1
    assert fake.clock.now >= 1003.0


def test_macos_label_never_freed_is_a_bounded_error(env: dict[str, str], tmp_path: Path) -> None:
    clock = FakeClock()
    fake = FakeLaunchctl(exit_seconds=3600.0, clock=clock)
    mac_env = {k: v for k, v in env.items() if k != "DBTUNNELD_HOME"}
    auto = Autostart(platform="darwin", env=mac_env, run=fake, uid=501, executable=str(fake_install(tmp_path)),
                     clock=clock, sleep=clock.sleep)
    auto.enable("tray", start_now=True)
    started = clock.now
    with pytest.raises(AutostartError) as err:
        auto.enable("tray", start_now=True)
    assert "Input/output error" in err.value.message and "launchctl print" in err.value.hint
    assert clock.now - started <= autostart_launchd.LAUNCHD_FREE_WAIT + autostart_launchd.LAUNCHD_POLL


def test_macos_plist_runs_unthrottled_with_homebrew_on_path(mac, env: dict[str, str], tmp_path: Path) -> None:  # noqa: ANN001
    auto, _ = mac
    auto.enable("daemon")
    data = plistlib.loads(plist_path(env).read_bytes())
    assert data["ProcessType"] in ("Standard", "Adaptive")
    folders = data["EnvironmentVariables"]["PATH"].split(":")
    assert folders[0] == str(tmp_path / WEIRD / "bin")       # this install's own folder first
    assert "/opt/homebrew/bin" in folders and "/usr/local/bin" in folders and "/usr/bin" in folders
    assert "DBTUNNELD_HOME" not in data["EnvironmentVariables"]     # only when the user set one


def test_macos_login_item_keeps_a_short_dbtunneld_home(env: dict[str, str], tmp_path: Path) -> None:
    """The long-socket-path fix on macOS is DBTUNNELD_HOME; the login item must start with it too."""
    auto = Autostart(platform="darwin", env=env, run=FakeLaunchctl(), uid=501, executable=str(fake_install(tmp_path)))
    auto.enable("tray")
    variables = plistlib.loads(plist_path(env).read_bytes())["EnvironmentVariables"]
    assert variables["DBTUNNELD_HOME"] == env["DBTUNNELD_HOME"]


def test_plist_escapes_xml_in_paths() -> None:
    odd = ["/Users/a&b/<bin>/dbtunneld", "tray"]
    data = plistlib.loads(autostart_launchd.render_plist(odd, "tray", Path("/tmp/l&gs")).encode())
    assert data["ProgramArguments"] == odd and data["StandardOutPath"].startswith("/tmp/l&gs/")


# --- Windows: the Run key through a fake winreg ---------------------------------------------------


class _FakeKey:
    def __init__(self, store: dict[str, object]) -> None:
        self.store = store

    def __enter__(self) -> "_FakeKey":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class FakeWinreg:
    """Fake of the winreg module (HKCU only), raising FileNotFoundError like the real one."""

    HKEY_CURRENT_USER = "HKCU"
    KEY_READ, KEY_SET_VALUE, REG_SZ, REG_BINARY = 0x20019, 0x0002, 1, 3

    def __init__(self) -> None:
        self.keys: dict[str, dict[str, object]] = {}

    def CreateKeyEx(self, root, sub, reserved=0, access=0):  # noqa: ANN001, N802
        return _FakeKey(self.keys.setdefault(f"{root}\\{sub}", {}))

    def OpenKey(self, root, sub, reserved=0, access=0):  # noqa: ANN001, N802
        if f"{root}\\{sub}" not in self.keys:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return _FakeKey(self.keys[f"{root}\\{sub}"])

    def SetValueEx(self, key, name, reserved, typ, value):  # noqa: ANN001, N802
        key.store[name] = value

    def QueryValueEx(self, key, name):  # noqa: ANN001, N802
        if name not in key.store:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        return key.store[name], self.REG_SZ

    def DeleteValue(self, key, name):  # noqa: ANN001, N802
        if name not in key.store:
            raise FileNotFoundError(2, "The system cannot find the file specified")
        del key.store[name]


def windows(tmp_path: Path, pythonw: bool) -> tuple[Autostart, FakeWinreg, Path]:
    scripts = tmp_path / "Python 311" / "Scripts"
    scripts.mkdir(parents=True)
    for name in (["pythonw.exe"] if pythonw else []) + ["dbtunneld.exe"]:
        (scripts / name).write_text("")
        (scripts / name).chmod(0o755)
    reg = FakeWinreg()
    auto = Autostart(platform="win32", env={"HOME": str(tmp_path)}, winreg=reg,
                     executable=str(scripts / "python.exe"))
    return auto, reg, scripts


def test_windows_run_value_uses_pythonw_quoted(tmp_path: Path) -> None:
    auto, reg, scripts = windows(tmp_path, pythonw=True)
    change = auto.enable("tray")
    value = reg.keys[f"HKCU\\{RUN_KEY}"][RUN_VALUE]
    assert value == f'"{scripts / "pythonw.exe"}" -m dbtunneld tray'  # no console window at login
    assert change.status.enabled and change.status.mechanism == "registry"
    assert change.status.command == (str(scripts / "pythonw.exe"), "-m", "dbtunneld", "tray")
    assert auto.disable().status.location is None and RUN_VALUE not in reg.keys[f"HKCU\\{RUN_KEY}"]


def test_windows_falls_back_to_the_script_and_sees_task_manager_off(tmp_path: Path) -> None:
    auto, reg, scripts = windows(tmp_path, pythonw=False)
    auto.enable("tray")
    assert reg.keys[f"HKCU\\{RUN_KEY}"][RUN_VALUE] == f'"{scripts / "dbtunneld.exe"}" tray'
    reg.keys[f"HKCU\\{APPROVED_KEY}"] = {RUN_VALUE: b"\x03" + b"\x00" * 11}  # Task Manager: Disabled
    st_ = auto.status()
    assert not st_.enabled and "Task Manager" in st_.problems[0]
    assert auto.enable("tray").status.enabled  # enabling again clears the mark


# --- which program, and quoting ------------------------------------------------------------------


def test_program_command_prefers_this_install_then_path_then_python_m(tmp_path: Path) -> None:
    python = fake_install(tmp_path)
    assert program_command("tray", "linux", str(python)) == [str(python.parent / "dbtunneld"), "tray"]
    lone = str(tmp_path / "elsewhere" / "python3")
    assert program_command("daemon", "linux", lone, which=lambda n: "/opt/x/dbtunneld") == [
        "/opt/x/dbtunneld", "daemon"]
    assert program_command("daemon", "linux", lone, which=lambda n: None) == [
        lone, "-m", "dbtunneld", "daemon"]


ARG = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=30)


@given(st.lists(ARG, min_size=1, max_size=4))
def test_desktop_exec_quoting_round_trips(argv: list[str]) -> None:
    assert desktop_exec_split(desktop_exec_quote(argv)) == argv


@given(st.lists(ARG, min_size=1, max_size=4))
def test_systemd_quoting_round_trips(argv: list[str]) -> None:
    assert systemd_split(systemd_quote(argv)) == argv


@given(st.lists(ARG.filter(lambda s: '"' not in s and not s.endswith("\\")), min_size=1, max_size=4))
def test_windows_command_line_round_trips(argv: list[str]) -> None:
    assert windows_split(windows_command_line(argv)) == argv


def test_autostart_imports_no_engine_or_adapter() -> None:
    code = ("import sys, dbtunneld.ui.autostart; "
            "print(sorted(m for m in sys.modules if m.startswith('dbtunneld')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30,
                         check=True, cwd=ROOT).stdout
    loaded = set(json.loads(out.replace("'", '"')))
    assert {m for m in loaded if not m.startswith("dbtunneld.ui.autostart")} <= {"dbtunneld", "dbtunneld.ui", "dbtunneld.core",
                                                                         "dbtunneld.core.errors", "dbtunneld.core.paths"}
    assert "dbtunneld.ui.autostart_launchd" in loaded       # the back-ends are loaded, and nothing below them
