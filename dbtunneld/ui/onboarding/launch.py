"""Starting the first-run window: `dbtunneld init --gui` as its own process, what it does once the
config is written (start the daemon, connect the new clusters), and the terminal fallback when
this Python has no tkinter (Debian: ``apt install python3-tk``; Homebrew: ``brew install python-tk``).
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import sys
from pathlib import Path

from ...core.paths import Paths
from ...process.client import ensure_daemon
from .prompt import Prompter

TK_MISSING = ("this Python has no tkinter, so the setup window cannot open; "
              "install it (Debian/Ubuntu: sudo apt install python3-tk; Homebrew: brew install python-tk) "
              "or answer the same questions in a terminal: dbtunneld init")
TERMINALS = (("x-terminal-emulator", "-e"), ("gnome-terminal", "--"), ("konsole", "-e"), ("xfce4-terminal", "-x"),
             ("xterm", "-e"))


def gui_command(config_path: str | Path) -> list[str]:
    """The argv the tray runs for "Set up…"."""
    return [sys.executable, "-m", "dbtunneld", "--config", str(config_path), "init", "--gui"]


def start_and_connect(paths: Paths, config_path: Path, added: list[str], ui: Prompter) -> str:
    """After the config is written: the daemon runs it (started, or reloaded when it runs) and
    connects the clusters just added. Returns the summary the window's last page shows."""
    from ...process.client import Client

    running = Client(paths.socket_path).ping()
    ui.say("asking the running daemon to reload the config…" if running else "starting the dbtunneld daemon…")
    client = ensure_daemon(paths, config_path)
    if running:
        client.request("reload")
    for name in added:
        client.request("connect", name=name, wait=0.0)
    ports = {t["name"]: t.get("local_port") for t in client.request("status").get("tunnels", [])}
    lines = [f"dbtunneld is running with {config_path}."]
    lines += [f"{name}: connecting on 127.0.0.1:{ports.get(name)}  (mysql -h 127.0.0.1 -P {ports.get(name)})"
              for name in added]
    if not added:
        lines.append("No cluster was added.")
    lines.append("The tray menu shows each cluster; copy the user and password from there.")
    return "\n".join(lines)


def open_terminal_with_init(config_path: str | Path, platform: str = sys.platform) -> bool:
    """Open a terminal running `dbtunneld init` (the fallback without tkinter); False when none is found."""
    command = shlex.join([sys.executable, "-m", "dbtunneld", "--config", str(config_path), "init"])
    if platform == "darwin":
        quoted = command.replace("\\", "\\\\").replace('"', '\\"')
        script = f'tell application "Terminal" to do script "{quoted}"'
        argv = ["osascript", "-e", script]
    else:
        found = next(((t, flag) for t, flag in TERMINALS if shutil.which(t)), None)
        if found is None:
            return False
        argv = [found[0], found[1], "sh", "-c", f"{command}; echo; read -p 'Press Return to close' _"]
    subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True)
    return True
