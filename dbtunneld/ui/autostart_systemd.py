"""Headless Linux: the systemd user unit $XDG_CONFIG_HOME/systemd/user/dbtunneld.service runs the
daemon (its ExecStart= quoting, systemctl --user, reading the unit back)."""

from __future__ import annotations

from typing import Sequence

from .autostart_common import REWRITE, AutostartError, LoginContext, LoginFile, Ran, remove_file, split_words, template, write_atomic

UNIT_NAME = "dbtunneld.service"


def systemd_quote(argv: Sequence[str]) -> str:
    """An ExecStart= value: every word double-quoted with C-style escapes and ``%`` doubled; ``$``
    doubled in the arguments (systemd expands variables there, not in the program path)."""
    def one(arg: str, is_program: bool) -> str:
        arg = arg.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
        return '"' + (arg if is_program else arg.replace("$", "$$")) + '"'
    return " ".join(one(a, i == 0) for i, a in enumerate(argv))


def systemd_split(value: str) -> list[str]:
    """Inverse of systemd_quote, also accepting unquoted words."""
    def escape(v: str, i: int, quoted: bool, nwords: int) -> int:
        doubled = v[i] == "%" or (v[i] == "$" and nwords > 0)  # `$$` only after the program
        if (v[i] == "\\" and i + 1 < len(v)) or (doubled and v[i + 1:i + 2] == v[i]):
            return 2
        return 0
    return split_words(value, escape)


def render_unit(command: Sequence[str]) -> str:
    return template("dbtunneld.service").substitute(exec_start=systemd_quote(command))


class SystemdUserUnit(LoginFile):
    """Headless Linux: $XDG_CONFIG_HOME/systemd/user/dbtunneld.service runs the daemon."""

    mechanism = "systemd"

    def __init__(self, ctx: LoginContext) -> None:
        self.ctx = ctx
        self.path = ctx.config_home / "systemd" / "user" / UNIT_NAME

    def _systemctl(self, *args: str) -> Ran:
        return self.ctx.run(["systemctl", "--user", *args], self.ctx.env)

    def manager_runs(self) -> bool:
        ran = self._systemctl("is-system-running")
        return ran.returncode != 127 and ran.stdout.strip() not in ("", "offline")

    def enable(self, mode: str, start_now: bool) -> list[str]:
        command = self.ctx.command_for(mode)
        if set(command[0]) & set("\"'\\") or not command[0].isprintable():
            raise AutostartError(f"systemd refuses a program path with quotes or backslashes: "
                                 f"{command[0]}", hint="install dbtunneld under a plain path "
                                 "(e.g. `pipx install dbtunneld`), or use --mode tray")
        write_atomic(self.path, render_unit(command))
        notes = [f"wrote {self.path}"]
        manager = self.manager_runs()
        if manager:
            self._systemctl("daemon-reload")
        now = start_now and manager and not self.ctx.daemon_answers()
        ran = self._systemctl("enable", *(["--now"] if now else []), UNIT_NAME)
        if ran.returncode == 127:
            return notes + ["systemctl not found: the unit is written but not enabled; start "
                            "`dbtunneld daemon` from your session or init system instead"]
        if ran.returncode != 0:
            raise AutostartError(f"systemctl --user enable {UNIT_NAME} failed: "
                                 f"{(ran.stderr or ran.stdout).strip()}",
                                 hint=f"see `systemctl --user status {UNIT_NAME}`")
        return notes + [self._enable_note(manager, start_now, now)]

    @staticmethod
    def _enable_note(manager: bool, start_now: bool, now: bool) -> str:
        if now:
            return f"enabled and started {UNIT_NAME} (systemctl --user enable --now)"
        if not manager:
            return (f"enabled {UNIT_NAME}; no systemd user manager runs in this session, so it "
                    f"starts at the next login (`loginctl enable-linger` starts it at boot)")
        if start_now:
            return f"enabled {UNIT_NAME}; a daemon is already running: systemd starts it from the next login"
        return f"enabled {UNIT_NAME}: it starts at the next login"

    def disable(self, stop_now: bool) -> list[str]:
        if not self.path.exists():
            return []
        manager = self.manager_runs()
        self._systemctl("disable", *(["--now"] if stop_now and manager else []), UNIT_NAME)
        remove_file(self.path)
        if manager:
            self._systemctl("daemon-reload")
        return [f"disabled {UNIT_NAME} and removed {self.path}"
                + ("" if stop_now or not manager else " (a running daemon keeps running)")]

    def _loaded(self) -> bool | None:
        if not self.manager_runs():
            return None
        return self._systemctl("is-active", UNIT_NAME).stdout.strip() == "active"

    def _system_problems(self) -> list[str]:
        ran = self._systemctl("is-enabled", UNIT_NAME)
        state = ran.stdout.strip()
        if ran.returncode == 127:
            return ["systemctl not found: nothing starts this unit at login"]
        if state != "enabled":
            return [f"`systemctl --user is-enabled {UNIT_NAME}` says {state or ran.stderr.strip()!r}; "
                    f"{REWRITE}"]
        return []

    def _read(self, problems: list[str]) -> list[str]:
        for line in self.path.read_text("utf-8", errors="replace").splitlines():
            if line.strip().startswith("ExecStart="):
                return systemd_split(line.split("=", 1)[1].strip())
        problems.append(f"{self.path}: no ExecStart line; {REWRITE}")
        return []
