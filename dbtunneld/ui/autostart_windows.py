"""Windows: the value "dbtunneld" under HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run (its
command line, and Task Manager's StartupApproved switch)."""

from __future__ import annotations

import subprocess
from typing import Any, Sequence

from .autostart_common import AutostartStatus, LoginContext, mode_of, program_missing, split_words

RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
APPROVED_KEY = r"Software\Microsoft\Windows\CurrentVersion\Explorer\StartupApproved\Run"
RUN_VALUE = "dbtunneld"


def windows_command_line(argv: Sequence[str]) -> str:
    """A Run value: the program always quoted (an unquoted path with spaces is a known hijack)."""
    rest = subprocess.list2cmdline(list(argv[1:]))
    return f'"{argv[0]}"' + (f" {rest}" if rest else "")


def windows_split(value: str) -> list[str]:
    """Split a command line of the form windows_command_line writes (quotes, no escapes)."""
    return split_words(value, lambda v, i, quoted, nwords: 0)


class RunKey:
    """Windows: HKCU\\Software\\Microsoft\\Windows\\CurrentVersion\\Run, value "dbtunneld"."""

    mechanism = "registry"

    def __init__(self, ctx: LoginContext) -> None:
        self.ctx = ctx
        self.reg = ctx.winreg
        self.location = f"HKCU\\{RUN_KEY}\\{RUN_VALUE}"

    def enable(self, mode: str, start_now: bool) -> list[str]:
        cmd = windows_command_line(self.ctx.command_for(mode))
        with self.reg.CreateKeyEx(self.reg.HKEY_CURRENT_USER, RUN_KEY, 0, self.reg.KEY_SET_VALUE) as k:
            self.reg.SetValueEx(k, RUN_VALUE, 0, self.reg.REG_SZ, cmd)
        self._delete(APPROVED_KEY)  # a "Disabled" mark from Task Manager would hide our entry
        notes = [f"set {self.location} = {cmd}"]
        if start_now:
            notes.append("Windows starts it at the next sign-in; run `dbtunneld tray` to start it now")
        return notes

    def disable(self, stop_now: bool) -> list[str]:
        removed = self._delete(RUN_KEY)
        self._delete(APPROVED_KEY)
        return [f"removed {self.location}"] if removed else []

    def status(self) -> AutostartStatus | None:
        value = self._query(RUN_KEY)
        if value is None:
            return None
        command = windows_split(str(value))
        problems = program_missing(command, self.location)
        approved = self._query(APPROVED_KEY)
        if isinstance(approved, (bytes, bytearray)) and approved and approved[0] & 1:
            problems.append("switched off in Task Manager > Startup apps; switch it on there or "
                            "run `dbtunneld autostart enable`")
        return AutostartStatus(not problems, self.mechanism, mode_of(command), self.location,
                               tuple(command), None, tuple(problems))

    def _query(self, key: str) -> Any:
        try:
            with self.reg.OpenKey(self.reg.HKEY_CURRENT_USER, key, 0, self.reg.KEY_READ) as k:
                return self.reg.QueryValueEx(k, RUN_VALUE)[0]
        except FileNotFoundError:
            return None

    def _delete(self, key: str) -> bool:
        try:
            with self.reg.OpenKey(self.reg.HKEY_CURRENT_USER, key, 0, self.reg.KEY_SET_VALUE) as k:
                self.reg.DeleteValue(k, RUN_VALUE)
            return True
        except FileNotFoundError:
            return False
