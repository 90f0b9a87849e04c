"""macOS: the LaunchAgent ~/Library/LaunchAgents/io.github.dbtunneld.plist, loaded into the
gui/UID domain (launchd restarts it after a crash, not after a clean quit)."""

from __future__ import annotations

import logging
import plistlib
import posixpath
from pathlib import Path
from typing import Mapping, Sequence
from xml.parsers.expat import ExpatError
from xml.sax.saxutils import escape as xml_escape

from ..core.paths import default_paths
from .autostart_common import REWRITE, AutostartError, LoginContext, LoginFile, Ran, template, write_atomic, remove_file

log = logging.getLogger(__name__)

LAUNCHD_LABEL = "io.github.dbtunneld"
# launchd keeps a booted-out label until its process has exited (SIGKILL after ExitTimeOut, 20 s by
# default); until then `bootstrap` fails with 5 (EIO) or 37 (EALREADY, operation in progress).
LAUNCHD_FREE_WAIT = 25.0
LAUNCHD_POLL = 0.5
BOOTSTRAP_BUSY = (5, 37)
# launchd starts agents with PATH=/usr/bin:/bin:/usr/sbin:/sbin: add Homebrew's folders (Apple
# silicon, Intel) so that a Homebrew session-manager-plugin or ssh is found.
LAUNCHD_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")


def render_plist(command: Sequence[str], mode: str, log_dir: Path, label: str = LAUNCHD_LABEL,
                 env: Mapping[str, str] | None = None) -> str:
    """``env``: the caller's environment; a DBTUNNELD_HOME set there is kept for the login item."""
    args = "\n".join(f"\t\t<string>{xml_escape(a)}</string>" for a in command)
    variables = {"PATH": launchd_path(command)}
    if env and env.get("DBTUNNELD_HOME"):
        variables["DBTUNNELD_HOME"] = env["DBTUNNELD_HOME"]
    environment = "\n".join(f"\t\t<key>{k}</key>\n\t\t<string>{xml_escape(v)}</string>" for k, v in variables.items())
    return template("launchd.plist").substitute(
        label=xml_escape(label), program_arguments=args, environment=environment,
        # Background would throttle the daemon's I/O and CPU (tunnels); Standard = no throttling
        process_type="Interactive" if mode == "tray" else "Standard",
        stdout_path=xml_escape(str(log_dir / f"launchd-{mode}.out.log")),
        stderr_path=xml_escape(str(log_dir / f"launchd-{mode}.err.log")),
    )


def launchd_path(command: Sequence[str]) -> str:
    """PATH for the LaunchAgent: the program's own folder first, then Homebrew's and the system's."""
    folders = [posixpath.dirname(command[0])] if command and posixpath.isabs(command[0]) else []
    return ":".join(dict.fromkeys(folders + list(LAUNCHD_PATH)))


class LaunchdAgent(LoginFile):
    """macOS: ~/Library/LaunchAgents/<label>.plist, loaded into the gui/UID domain."""

    mechanism = "launchd"

    def __init__(self, ctx: LoginContext) -> None:
        self.ctx = ctx
        self.path = ctx.home / "Library" / "LaunchAgents" / f"{LAUNCHD_LABEL}.plist"
        self.domain = f"gui/{ctx.uid}"
        self.target = f"{self.domain}/{LAUNCHD_LABEL}"

    def _launchctl(self, *args: str) -> Ran:
        return self.ctx.run(["launchctl", *args], self.ctx.env)

    def enable(self, mode: str, start_now: bool) -> list[str]:
        log_dir = default_paths(self.ctx.env, "darwin").log_dir
        log_dir.mkdir(parents=True, exist_ok=True)  # launchd does not create log folders
        write_atomic(self.path, render_plist(self.ctx.command_for(mode), mode, log_dir, env=self.ctx.env))
        notes = [f"wrote {self.path}"]
        self._launchctl("enable", self.target)  # clears a `launchctl disable` left from before
        if not start_now:
            return notes + ["launchd loads it at the next login"]
        if mode == "daemon" and self.ctx.daemon_answers():
            return notes + ["a daemon is already running: launchd takes over at the next login"]
        ran = self._reload()
        if ran.returncode != 0:
            raise AutostartError(f"launchctl bootstrap {self.domain} {self.path} failed: "
                                 f"{(ran.stderr or ran.stdout).strip()}",
                                 hint="the plist is written and loads at the next login; "
                                      "check `launchctl print " + self.target + "`")
        return notes + [f"loaded into launchd ({self.target}): running now"]

    def _reload(self) -> Ran:
        """bootout (not loaded is fine), wait until launchd has freed the label, then bootstrap."""
        self._launchctl("bootout", self.target)
        deadline = self.ctx.clock() + LAUNCHD_FREE_WAIT
        while self._loaded() and self.ctx.clock() < deadline:
            self.ctx.sleep(LAUNCHD_POLL)
        while True:
            ran = self._launchctl("bootstrap", self.domain, str(self.path))
            if ran.returncode not in BOOTSTRAP_BUSY or self.ctx.clock() >= deadline:
                return ran
            log.warning("launchctl bootstrap: %s; retrying in %.1f s",
                        (ran.stderr or ran.stdout).strip(), LAUNCHD_POLL)
            self.ctx.sleep(LAUNCHD_POLL)

    def disable(self, stop_now: bool) -> list[str]:
        notes = []
        if stop_now and self._launchctl("bootout", self.target).returncode == 0:
            notes.append(f"unloaded {self.target} (stopped)")
        if remove_file(self.path):
            notes.append(f"removed {self.path}")
        return notes

    def _system_problems(self) -> list[str]:
        if self._disabled_override():
            return [f"{self.target} is disabled in launchd (`launchctl disable`); {REWRITE}"]
        return []

    def _loaded(self) -> bool | None:
        return self._launchctl("print", self.target).returncode == 0

    def _read(self, problems: list[str]) -> list[str]:
        try:
            data = plistlib.loads(self.path.read_bytes())
        except (plistlib.InvalidFileException, ExpatError, ValueError, OSError) as exc:
            problems.append(f"{self.path} is not a valid plist ({exc}); {REWRITE}")
            return []
        if not isinstance(data, dict) or data.get("Label") != LAUNCHD_LABEL:
            problems.append(f"{self.path}: Label is not {LAUNCHD_LABEL}; {REWRITE}")
        args = data.get("ProgramArguments") if isinstance(data, dict) else None
        if not (isinstance(args, list) and args and all(isinstance(a, str) for a in args)):
            problems.append(f"{self.path}: ProgramArguments is missing or empty; {REWRITE}")
            return []
        return list(args)

    def _disabled_override(self) -> bool:
        out = self._launchctl("print-disabled", self.domain).stdout
        for line in out.splitlines():
            if f'"{LAUNCHD_LABEL}"' in line:
                return line.split("=>")[-1].strip() in ("disabled", "true")
        return False
