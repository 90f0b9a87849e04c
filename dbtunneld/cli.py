"""The `dbtunneld` command line: parses arguments and dispatches to subcommand modules.

Front-end layer: talks to the daemon only through ``client`` (control socket). Errors are one
line plus a hint on stderr; tracebacks go to the log only.

Exit codes: ``exitcodes`` (0 ok, 1 failure, 2 usage or config, 3 no daemon, 4 sign-in needed,
5 unhealthy, 6 another daemon already running).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .errors import ConfigError, DbtunneldError, NeedsUserError, SignInNeededError, UnknownNameError

from .exitcodes import EXIT_FAIL, EXIT_NO_DAEMON, EXIT_OK, EXIT_SIGN_IN, EXIT_UNHEALTHY, EXIT_USAGE  # noqa: F401


def _cmd_version(args: argparse.Namespace) -> int:
    print(f"dbtunneld {__version__}")
    return EXIT_OK


def _cmd_config_check(args: argparse.Namespace) -> int:
    from .config import load_config
    from .paths import default_paths

    path = args.path or args.config or default_paths().config_file
    cfg = load_config(path)  # ConfigError -> exit 2 in main()
    print(f"{path}: ok ({len(cfg.clusters)} cluster{'s' if len(cfg.clusters) != 1 else ''})")
    return EXIT_OK


def _cmd_init(args: argparse.Namespace) -> int:
    from .onboarding.wizard import run_init

    paths = _paths()
    config = Path(args.config or paths.config_file)
    if args.gui:
        return _init_window(paths, config, open_browser=not args.no_browser)
    run_init(config, ports_file=paths.ports_file, open_browser=not args.no_browser)
    return EXIT_OK


def _init_window(paths, config: Path, open_browser: bool) -> int:
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


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox.cli import run_sandbox

    return run_sandbox(args)


def _cmd_autostart(args: argparse.Namespace) -> int:
    from .autostart import run_cli

    return run_cli(args)


def _cmd_tray(args: argparse.Namespace) -> int:
    from .tray import run_tray

    return run_tray(config_path=args.config)


# ----------------------------------------------------------------------------- daemon commands

CONNECT_WAIT = 30.0
STOP_WAIT = 30.0


def _paths():
    from .paths import default_paths

    return default_paths()


def _client(args: argparse.Namespace, start: bool = False):
    """A client of the running daemon; with ``start`` a daemon is started when none answers."""
    from .client import Client, ensure_daemon

    paths = _paths()
    if start:
        return ensure_daemon(paths, config_path=args.config)
    return Client(paths.socket_path)


def _ago(t: float | None, now: float) -> str:
    return _span(now - t) if t else ""


def _span(seconds: float) -> str:
    s = int(max(0, seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def _credential_line(label: str, c: dict | None, now: float) -> str:
    if not c:
        return f"{label:<6} -"
    parts = [f"{label:<6} {c.get('name', '')}", c.get("state", "")]
    if c.get("expires_at"):
        parts.append(f"expires in {_span(c['expires_at'] - now)}")
    if c.get("identity"):
        # Vault's identity is the token's accessor (safe to show: it cannot be used as the token)
        parts.append(f"accessor {c['identity']}" if c.get("kind") == "vault" else c["identity"])
    if c.get("last_error"):
        parts.append(c["last_error"])
    return "  ".join(p for p in parts if p)


def _tunnel_detail(t: dict, now: float) -> str:
    if t.get("state") == "up" and t.get("role") and t.get("role") != t.get("expected_role"):
        return f"{t['expected_role']} port answers as a {t['role']} (failover?)"
    if t.get("next_retry_at") and t.get("state") in ("backoff", "reconnecting"):
        return f"retry in {_span(t['next_retry_at'] - now)}: {t.get('last_error', '')}".rstrip(": ")
    if t.get("last_error") and t.get("state") != "up":
        return t["last_error"] + (f" (hint: {t['hint']})" if t.get("hint") else "")
    role = t.get("role", "") if t.get("state") == "up" else ""
    return "  ".join(p for p in (role, "PRODUCTION" if t.get("production") else "") if p)


def render_status(st: dict, now: float) -> str:
    """The `dbtunneld status` table (pure: tested from literals)."""
    lines = [_credential_line("AWS", st.get("aws"), now), _credential_line("Vault", st.get("vault"), now), ""]
    rows = [("NAME", "LOCAL", "STATE", "SINCE", "USER", "DETAIL")]
    for t in st.get("tunnels", []):
        rows.append((t["name"], f"127.0.0.1:{t['local_port']}" if t.get("local_port") else "-",
                     t.get("state", ""), _ago(t.get("since"), now), t.get("username", ""), _tunnel_detail(t, now)))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        lines.append("  ".join(r[i].ljust(widths[i]) for i in range(5)) + "  " + r[5])
    if st.get("keyring"):
        lines += ["", f"keyring: {st['keyring']}"]
    return "\n".join(line.rstrip() for line in lines)


def status_exit_code(st: dict) -> int:
    creds = [c for c in (st.get("aws"), st.get("vault")) if c]
    tunnels = [t for t in st.get("tunnels", []) if t.get("state") != "stopped"]
    if any(c.get("state") == "needs_sign_in" for c in creds) or any(t.get("state") == "needs_sign_in" for t in tunnels):
        return EXIT_SIGN_IN
    return EXIT_UNHEALTHY if st.get("health") in ("degraded", "needs_action") else EXIT_OK


def _cmd_status(args: argparse.Namespace) -> int:
    import json
    import time

    st = _client(args).request("status")
    print(json.dumps(st, indent=2, sort_keys=True) if args.json else render_status(st, time.time()))
    return status_exit_code(st)


def _target_args(args: argparse.Namespace, default_all: bool = False) -> dict:
    if args.all or (default_all and not args.name):
        return {"all": True}
    if not args.name:
        raise UsageError("name a cluster or pass --all", "`dbtunneld status` lists the clusters")
    return {"name": args.name}


class UsageError(DbtunneldError):
    """Wrong arguments: exit 2."""


def _describe_tunnel(t: dict) -> str:
    where = f"127.0.0.1:{t.get('local_port')}"
    if t.get("state") == "up":
        who = f" as {t['username']}" if t.get("username") else ""
        return f"{t['name']}: up on {where}{who}"
    detail = f": {t['last_error']}" if t.get("last_error") else ""
    hint = f" (hint: {t['hint']})" if t.get("hint") else ""
    return f"{t['name']}: {t.get('state')} on {where}{detail}{hint}"


def _cmd_connect(args: argparse.Namespace) -> int:
    wait = 0.0 if args.no_wait else args.wait
    result = _client(args, start=True).request("connect", timeout=wait + 15, wait=wait, **_target_args(args))
    for t in result["tunnels"]:
        print(_describe_tunnel(t))
    if args.no_wait or all(t.get("state") == "up" for t in result["tunnels"]):
        return EXIT_OK
    return EXIT_SIGN_IN if any(t.get("state") == "needs_sign_in" for t in result["tunnels"]) else EXIT_UNHEALTHY


def render_revocation(outcomes: list[dict], now: float) -> list[str]:
    """One line per DB user that was to be revoked, then each distinct fix once."""
    lines, hints = [], []
    for o in outcomes:
        who = f"{o['cluster']}: user {o['username']}"
        if o.get("revoked"):
            lines.append(f"{who} revoked" + (" (with the Vault token that created it)" if o.get("how") == "token" else ""))
            continue
        until = o.get("valid_until")
        end = (f"it stays valid until {_utc(until)} (in {_span(until - now)})" if until else
               "it stays valid until its lease expires")
        lines.append(f"{who} NOT revoked ({o.get('reason') or 'unknown'}); "
                     + ("the next start tries again" if o.get("retried") else end))
        if o.get("hint") and o["hint"] not in hints:
            hints.append(o["hint"])
    return lines + [f"hint: {h}" for h in hints]


def _utc(epoch: float) -> str:
    import time

    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(epoch))


def _revocation_summary(outcomes: list[dict] | None) -> str:
    if outcomes is None:
        return "what was revoked is in the daemon's log (it did not report in time)"
    if not outcomes:
        return "no DB user was held"
    kept = sum(1 for o in outcomes if not o.get("revoked"))
    return f"{kept} of {len(outcomes)} DB user(s) NOT revoked (see above)" if kept else "every DB user revoked"


def _cmd_disconnect(args: argparse.Namespace) -> int:
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


def _cmd_reconnect(args: argparse.Namespace) -> int:
    names = _client(args).request("reconnect", **_target_args(args, default_all=True))["reconnecting"]
    print(f"reconnecting: {', '.join(names)}" if names else "nothing is connected")
    return EXIT_OK


def render_creds(c: dict, now: float) -> str:
    """The `dbtunneld creds NAME` block; the password is never in it."""
    db = f", database {c['database']}" if c.get("database") else ""
    prod = "  PRODUCTION" if c.get("production") else ""
    lines = [f"{c['name']} (127.0.0.1:{c['port']}{db}){prod}",
             f"username  {c['username']}",
             f"password  not shown: `dbtunneld creds {c['name']} --field password` or `--copy`",
             f"mysql     {c['mysql']}", f"url       {c['url']}", f"jdbc      {c['jdbc']}"]
    if c.get("login") == "local":
        lines.append(f"login     local: stable, saved logins keep working (now as {c.get('lease_user', '')})")
    if c.get("expires_at"):
        lines.append(f"expires   in {_span(c['expires_at'] - now)} (renewed while connected)")
    return "\n".join(lines)


def _copy_to_clipboard(value: str, seconds: float) -> str:
    try:
        from . import clipboard
    except ImportError:
        raise NeedsUserError("copying needs the clipboard module, which this install lacks",
                             "print the value with --field instead") from None
    return clipboard.copy_secret(value, clear_after=seconds) or ""


def _cmd_creds(args: argparse.Namespace) -> int:
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


def _cmd_renew(args: argparse.Namespace) -> int:
    kw: dict = {"name": args.name} if args.name else {}
    if args.rotate:
        kw["rotate"] = True
    names = _client(args).request("renew", timeout=60, **kw)["renewed"]
    print(f"renewed the credentials of {', '.join(names)}" if names else "nothing is connected")
    return EXIT_OK


def _cmd_reset_password(args: argparse.Namespace) -> int:
    c = _client(args).request("reset_password", name=args.name)
    print(f"new local password for {c['username']} on {args.name}: `dbtunneld creds {args.name} --copy` "
          "(saved logins need it; open sessions go on)")
    return EXIT_OK


def _signed_in_line(info: dict) -> str:
    who = info.get("identity") or ""
    return f"signed in as {who}" if who else "signed in"


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


def _cmd_login(args: argparse.Namespace) -> int:
    import webbrowser

    device = args.use_device_code or args.no_browser or not _browser_available()
    client = _client(args, start=True)
    info = client.request("login", wait=0.0, use_device_code=device)
    if info.get("signed_in"):
        print(_signed_in_line(info))
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
    print(_signed_in_line(done))
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace) -> int:
    from .doctor import run_doctor

    return run_doctor(args.config, report=args.report, cluster=args.cluster)


def _cmd_daemon(args: argparse.Namespace) -> int:
    from .daemon import run_daemon

    paths = _paths()
    return run_daemon(paths, args.config or paths.config_file, foreground=not args.background)


def _cmd_reload(args: argparse.Namespace) -> int:
    summary = _client(args).request("reload")
    changes = [f"{k} {', '.join(v)}" for k, v in summary.items() if v and k != "kept"]
    print("reloaded: " + ("; ".join(changes) if changes else "no change"))
    return EXIT_OK


def _cmd_stop(args: argparse.Namespace) -> int:
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
    print(f"daemon stopped (pid {pid}); {_revocation_summary(outcomes)}")
    return EXIT_OK


def _add_daemon_commands(sub) -> None:
    st = sub.add_parser("status", help="tunnels and credentials (exit 4: sign-in needed, 5: unhealthy)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=_cmd_status)

    for name, helptext, func in (("connect", "connect a cluster (starts the daemon if needed)", _cmd_connect),
                                 ("disconnect", "close a tunnel and revoke its DB user", _cmd_disconnect),
                                 ("reconnect", "rebuild tunnels now, or retry failed ones (default: all connected)", _cmd_reconnect)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("name", nargs="?", help="cluster name")
        p.add_argument("--all", action="store_true", help="every cluster")
        p.set_defaults(func=func)
        if name == "connect":
            p.add_argument("--wait", type=float, default=CONNECT_WAIT, help="seconds to wait for the tunnel (default 30)")
            p.add_argument("--no-wait", action="store_true", help="return at once")

    cr = sub.add_parser("creds", help="DB username, mysql command, URLs (the password only with --field password)")
    cr.add_argument("name", help="cluster name")
    cr.add_argument("--field", choices=("username", "password", "mysql", "url", "jdbc", "lease_user"), help="print only this value")
    cr.add_argument("--copy", action="store_true", help="copy the field (default: the password) to the clipboard")
    cr.add_argument("--clear-after", type=float, default=30.0, help="seconds before a copied secret is cleared")
    cr.add_argument("--json", action="store_true", help="machine-readable output (no password unless --field password)")
    cr.set_defaults(func=_cmd_creds)

    rn = sub.add_parser("renew", help="renew credentials now")
    rn.add_argument("name", nargs="?", help="cluster name (default: all)")
    rn.add_argument("--rotate", action="store_true", help="mint new DB users now (login = \"local\": saved logins keep working)")
    rn.set_defaults(func=_cmd_renew)

    rp = sub.add_parser("reset-password", help='a new local password for a cluster (login = "local")')
    rp.add_argument("name", help="cluster name")
    rp.set_defaults(func=_cmd_reset_password)

    lg = sub.add_parser("login", help="AWS SSO sign-in (in the browser; device code when headless)")
    lg.add_argument("--no-browser", action="store_true",
                    help="do not open a browser: print a URL and code for any device (device code flow)")
    lg.add_argument("--use-device-code", action="store_true", help="use the device code flow (as `aws sso login`)")
    lg.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the confirmation")
    lg.set_defaults(func=_cmd_login)

    dr = sub.add_parser("doctor", help="check each layer in order and name the first broken one")
    dr.add_argument("--report", metavar="FILE", help="write a redacted report for a bug ticket")
    dr.add_argument("--cluster", help="check the path to this cluster (default: the first one)")
    dr.set_defaults(func=_cmd_doctor)

    dm = sub.add_parser("daemon", help="run the daemon (logs to stderr and the log file)")
    dm.add_argument("--background", action="store_true", help="log to the file only")
    dm.set_defaults(func=_cmd_daemon)

    sub.add_parser("reload", help="re-read the config (refused whole if invalid)").set_defaults(func=_cmd_reload)
    sp = sub.add_parser("stop", help="stop the daemon (closes tunnels, revokes leases)")
    sp.add_argument("--wait", type=float, default=STOP_WAIT, help="seconds to wait for it to finish")
    sp.set_defaults(func=_cmd_stop)


def _log_traceback(exc: BaseException) -> str:
    """Write the traceback to the CLI log (never to the terminal); return the log's path."""
    import logging
    import traceback

    from . import log as logsetup

    path = _paths().log_dir / "cli.log"
    try:
        logsetup.setup_logging(path, stderr=False)
        logging.getLogger("dbtunneld.cli").error("unexpected error:\n%s",
                                                 "".join(traceback.format_exception(exc)))
    except OSError:
        return "(no log: the log folder is not writable)"
    return str(path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbtunneld", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"dbtunneld {__version__}")
    p.add_argument("--config", help="config file (default: the platform config path)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("version", help="print the version").set_defaults(func=_cmd_version)

    cfg = sub.add_parser("config", help="config file tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    check = cfg_sub.add_parser("check", help="validate a config file; exit 2 listing every problem")
    check.add_argument("path", nargs="?")
    check.set_defaults(func=_cmd_config_check)

    it = sub.add_parser("init", help="write or extend config.toml by discovering profiles, clusters, bastion and roles")
    it.add_argument("--no-browser", action="store_true", help="only print the sign-in URL and code")
    it.add_argument("--gui", action="store_true", help="ask in a window (what the tray's Set up… opens), "
                                                        "then start the daemon and connect")
    it.set_defaults(func=_cmd_init)

    sb = sub.add_parser("sandbox", help="run the local stack of real servers (no AWS needed)")
    sb.add_argument("--no-daemon", action="store_true", help="only the servers, not the daemon")
    sb.add_argument("--short-ttl", action="store_true", help="use TTLs of seconds (for demos of renewal)")
    sb.add_argument("--no-tray", action="store_true", help="do not start the tray even with a display")
    sb.add_argument("--base-port", type=int, default=13306,
                    help="first local port for the demo clusters (default 13306; a busy one is replaced and said)")
    sb.add_argument("--sts-region", default="", metavar="REGION",
                    help="set the Vault aws auth up with this regional STS endpoint (default: the global one)")
    sb.add_argument("--vault-namespace", default="", metavar="NAME",
                    help="put the aws auth and database mounts in this Vault namespace (default: the root)")
    sb.set_defaults(func=_cmd_sandbox)

    au = sub.add_parser("autostart", help="start at login: enable | disable | status")
    au.set_defaults(func=_cmd_autostart, autostart_command="status")
    au_sub = au.add_subparsers(dest="autostart_command", metavar="ACTION")
    au_on = au_sub.add_parser("enable", help="start at login (replaces any other login item of ours)")
    au_on.add_argument("--mode", choices=("tray", "daemon"),
                       help="tray (default with a desktop) or daemon (default when headless)")
    au_on.add_argument("--no-start", action="store_true", help="only at the next login, not now")
    au_off = au_sub.add_parser("disable", help="stop starting at login (a running copy keeps running)")
    au_off.add_argument("--stop", action="store_true", help="also stop what launchd/systemd runs")
    au_st = au_sub.add_parser("status", help="what starts at login, read from the system")
    au_st.add_argument("--mode", choices=("tray", "daemon"), help="only that mode's login item")
    au_st.add_argument("--json", action="store_true", help="machine-readable output")
    sub.add_parser("tray", help="the tray menu (starts the daemon when none runs)").set_defaults(func=_cmd_tray)
    _add_daemon_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help()
        return EXIT_USAGE
    try:
        return func(args)
    except ConfigError as exc:
        print(exc.message, file=sys.stderr)
        print(f"hint: {exc.hint}", file=sys.stderr)
        return EXIT_USAGE
    except DbtunneldError as exc:
        print(f"dbtunneld: {exc.one_line()}", file=sys.stderr)
        return _exit_code_of(exc)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # a bug: one line here, the traceback in the log
        where = _log_traceback(exc)
        print(f"dbtunneld: internal error: {type(exc).__name__}: {exc} (details in {where})", file=sys.stderr)
        return EXIT_FAIL


def _exit_code_of(exc: DbtunneldError) -> int:
    from .client import DaemonNotRunning

    if isinstance(exc, DaemonNotRunning):
        return EXIT_NO_DAEMON
    if isinstance(exc, SignInNeededError):
        return EXIT_SIGN_IN
    if isinstance(exc, (UsageError, UnknownNameError)):
        return EXIT_USAGE
    return EXIT_FAIL


if __name__ == "__main__":
    sys.exit(main())
