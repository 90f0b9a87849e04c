"""The `dbtunneld` subcommands: each ``cmd_*`` takes the parsed arguments, talks to the daemon
through ``client`` (or runs a local tool) and returns the exit code. The parser is ``cli``'s; what
they print is ``cli_output``'s."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .. import __version__
from .cli_output import (describe_tunnel, render_creds, render_revocation, render_status, revocation_summary,
                         signed_in_line, status_exit_code)
from ..core.errors import DbtunneldError, NeedsUserError, SignInNeededError
from ..core.exitcodes import EXIT_FAIL, EXIT_OK, EXIT_SIGN_IN, EXIT_UNHEALTHY

if TYPE_CHECKING:      # imported where used: `dbtunneld --help` stays quick
    from ..core.paths import Paths
    from ..process.client import Client

CONNECT_WAIT = 30.0
STOP_WAIT = 30.0


class UsageError(DbtunneldError):
    """Wrong arguments: exit 2."""


def user_paths() -> Paths:
    from ..core.paths import default_paths

    return default_paths()


def _client(args: argparse.Namespace, start: bool = False) -> Client:
    """A client of the running daemon; with ``start`` a daemon is started when none answers."""
    from ..process.client import Client, ensure_daemon

    paths = user_paths()
    if start:
        return ensure_daemon(paths, config_path=args.config)
    return Client(paths.socket_path)


def _target_args(args: argparse.Namespace, default_all: bool = False) -> dict[str, Any]:
    if args.all or (default_all and not args.name):
        return {"all": True}
    if not args.name:
        raise UsageError("name a cluster or pass --all", "`dbtunneld status` lists the clusters")
    return {"name": args.name}


def cmd_version(args: argparse.Namespace) -> int:
    print(f"dbtunneld {__version__}")
    return EXIT_OK


def cmd_config_check(args: argparse.Namespace) -> int:
    from ..core.config import load_config
    from ..core.paths import default_paths

    path = args.path or args.config or default_paths().config_file
    cfg = load_config(path)  # ConfigError -> exit 2 in main()
    print(f"{path}: ok ({len(cfg.clusters)} cluster{'s' if len(cfg.clusters) != 1 else ''})")
    return EXIT_OK


def cmd_init(args: argparse.Namespace) -> int:
    from .onboarding.wizard import run_init

    paths = user_paths()
    config = Path(args.config or paths.config_file)
    if args.gui:
        return _init_window(paths, config, open_browser=not args.no_browser)
    run_init(config, ports_file=paths.ports_file, open_browser=not args.no_browser)
    return EXIT_OK


def _init_window(paths: Paths, config: Path, open_browser: bool) -> int:
    """`dbtunneld init --gui`: the first-run window; without tkinter, a terminal running `init`."""
    from .onboarding import launch

    try:
        from .onboarding.window import run_window
    except ImportError as exc:
        if exc.name not in ("tkinter", "_tkinter"):
            raise
        print(f"dbtunneld init --gui: {launch.TK_MISSING}", file=sys.stderr)
        if launch.open_terminal_with_init(config):
            return EXIT_OK
        print("no terminal emulator found to open it in: open a terminal and run `dbtunneld init`", file=sys.stderr)
        return EXIT_FAIL
    return run_window(config, ports_file=paths.ports_file, open_browser=open_browser,
                      after_write=lambda added, ui: launch.start_and_connect(paths, config, added, ui))


def cmd_autostart(args: argparse.Namespace) -> int:
    from .autostart import run_cli

    return run_cli(args)


def cmd_tray(args: argparse.Namespace) -> int:
    from .tray import run_tray

    return run_tray(config_path=args.config)


def cmd_status(args: argparse.Namespace) -> int:
    import json
    import time

    st = _client(args).request("status")
    print(json.dumps(st, indent=2, sort_keys=True) if args.json else render_status(st, time.time()))
    return status_exit_code(st)


def cmd_connect(args: argparse.Namespace) -> int:
    wait = 0.0 if args.no_wait else args.wait
    result = _client(args, start=True).request("connect", timeout=wait + 15, wait=wait, **_target_args(args))
    for t in result["tunnels"]:
        print(describe_tunnel(t))
    if args.no_wait or all(t.get("state") == "up" for t in result["tunnels"]):
        return EXIT_OK
    return EXIT_SIGN_IN if any(t.get("state") == "needs_sign_in" for t in result["tunnels"]) else EXIT_UNHEALTHY


def cmd_disconnect(args: argparse.Namespace) -> int:
    import time

    reply = _client(args).request("disconnect", **_target_args(args))
    outcomes = reply.get("revocation") or []
    for name in reply["disconnected"]:
        mine = [o for o in outcomes if o.get("cluster") == name]
        if not mine:
            print(f"{name}: disconnected (no credentials were held)")
        elif all(o.get("revoked") for o in mine):
            print(f"{name}: disconnected (credentials revoked)")
        else:
            print(f"{name}: disconnected")
            print("\n".join(render_revocation(mine, time.time())))
    if not reply["disconnected"]:
        print("nothing was connected")
    return EXIT_OK


def cmd_reconnect(args: argparse.Namespace) -> int:
    names = _client(args).request("reconnect", **_target_args(args, default_all=True))["reconnecting"]
    print(f"reconnecting: {', '.join(names)}" if names else "nothing is connected")
    return EXIT_OK


def _copy_to_clipboard(value: str, seconds: float) -> str:
    try:
        from . import clipboard
    except ImportError:
        raise NeedsUserError("copying needs the clipboard module, which this install lacks",
                             "print the value with --field instead") from None
    return clipboard.copy_secret(value, clear_after=seconds) or ""


def cmd_creds(args: argparse.Namespace) -> int:
    import json
    import time

    field = args.field or ("password" if args.copy else None)
    c = _client(args).request("creds", name=args.name, field=field or "username")
    if args.copy:
        note = _copy_to_clipboard(c[field], args.clear_after)
        print(f"copied the {field} of {args.name} to the clipboard{f' ({note})' if note else ''}")
    elif args.json:
        print(json.dumps(c, indent=2, sort_keys=True))
    elif field:
        print(c[field])
    else:
        print(render_creds(c, time.time()))
    return EXIT_OK


def cmd_renew(args: argparse.Namespace) -> int:
    kw: dict[str, Any] = {"name": args.name} if args.name else {}
    if args.rotate:
        kw["rotate"] = True
    names = _client(args).request("renew", timeout=60, **kw)["renewed"]
    print(f"renewed the credentials of {', '.join(names)}" if names else "nothing is connected")
    return EXIT_OK


def cmd_reset_password(args: argparse.Namespace) -> int:
    c = _client(args).request("reset_password", name=args.name)
    print(f"new local password for {c['username']} on {args.name}: `dbtunneld creds {args.name} --copy` "
          "(saved logins need it; open sessions go on)")
    return EXIT_OK


def _browser_available() -> bool:
    """A browser can be opened here (no: headless Linux without a display, no browser found)."""
    import os
    import webbrowser

    if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
        return False
    try:
        webbrowser.get()
    except webbrowser.Error:
        return False
    return True


def cmd_login(args: argparse.Namespace) -> int:
    import webbrowser

    device = args.use_device_code or args.no_browser or not _browser_available()
    client = _client(args, start=True)
    info = client.request("login", wait=0.0, use_device_code=device)
    if info.get("signed_in"):
        print(signed_in_line(info))
        return EXIT_OK
    url = info.get("verification_uri_complete") or info.get("verification_uri", "")
    if info.get("user_code"):
        print(f"Open {url} (on any device) and confirm the code {info['user_code']}")
    else:
        print(f"Sign in in the browser: {url}\n(on another device: `dbtunneld login --no-browser`)")
    if not device and url:
        webbrowser.open(url)
    done = client.request("login", wait=args.wait, timeout=args.wait + 15, use_device_code=device)
    if not done.get("signed_in"):
        raise SignInNeededError("the sign-in was not confirmed in time")
    print(signed_in_line(done))
    return EXIT_OK


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..process.doctor import run_doctor

    return run_doctor(args.config, report=args.report, cluster=args.cluster)


def cmd_daemon(args: argparse.Namespace) -> int:
    from ..process.daemon import run_daemon

    paths = user_paths()
    return run_daemon(paths, args.config or paths.config_file, foreground=not args.background)


def cmd_reload(args: argparse.Namespace) -> int:
    summary = _client(args).request("reload")
    changes = [f"{k} {', '.join(v)}" for k, v in summary.items() if v and k != "kept"]
    print("reloaded: " + ("; ".join(changes) if changes else "no change"))
    return EXIT_OK


def cmd_stop(args: argparse.Namespace) -> int:
    import time

    client = _client(args)
    reply = client.request("stop", wait=args.wait, timeout=args.wait + 10)
    pid = reply["pid"]
    deadline = time.monotonic() + args.wait
    while client.ping(timeout=1.0):
        if time.monotonic() > deadline:
            raise DbtunneldError(f"the daemon (pid {pid}) is still stopping", "see its log; it stops within its bound")
        time.sleep(0.05)
    outcomes = reply.get("revocation")
    for line in render_revocation(outcomes or [], time.time()):
        print(line)
    print(f"daemon stopped (pid {pid}); {revocation_summary(outcomes)}")
    return EXIT_OK
