"""The `dbtunneld` command line: parses arguments and dispatches to subcommand modules.

Owns the argument parser and ``main`` (errors -> one line and an exit code); the subcommands are
``cli_commands``, what they print ``cli_output``.

Front-end layer: talks to the daemon only through ``client`` (control socket). Errors are one
line plus a hint on stderr; tracebacks go to the log only.

Exit codes: ``exitcodes`` (0 ok, 1 failure, 2 usage or config, 3 no daemon, 4 sign-in needed,
5 unhealthy, 6 another daemon already running).
"""

from __future__ import annotations

import argparse
import sys

from .. import __version__
from ..core.errors import ConfigError, DbtunneldError, SignInNeededError, UnknownNameError
from ..core.exitcodes import EXIT_FAIL, EXIT_NO_DAEMON, EXIT_SIGN_IN, EXIT_USAGE
from . import cli_commands as commands


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from ..sandbox.cli import run_sandbox

    return run_sandbox(args)


def _add_daemon_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    st = sub.add_parser("status", help="tunnels and credentials (exit 4: sign-in needed, 5: unhealthy)")
    st.add_argument("--json", action="store_true", help="machine-readable output")
    st.set_defaults(func=commands.cmd_status)

    for name, helptext, func in (("connect", "connect a cluster (starts the daemon if needed)", commands.cmd_connect),
                                 ("disconnect", "close a tunnel and revoke its DB user", commands.cmd_disconnect),
                                 ("reconnect", "rebuild tunnels now, or retry failed ones (default: all connected)", commands.cmd_reconnect)):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("name", nargs="?", help="cluster name")
        p.add_argument("--all", action="store_true", help="every cluster")
        p.set_defaults(func=func)
        if name == "connect":
            p.add_argument("--wait", type=float, default=commands.CONNECT_WAIT, help="seconds to wait for the tunnel (default 30)")
            p.add_argument("--no-wait", action="store_true", help="return at once")

    cr = sub.add_parser("creds", help="DB username, mysql command, URLs (the password only with --field password)")
    cr.add_argument("name", help="cluster name")
    cr.add_argument("--field", choices=("username", "password", "mysql", "url", "jdbc", "lease_user"), help="print only this value")
    cr.add_argument("--copy", action="store_true", help="copy the field (default: the password) to the clipboard")
    cr.add_argument("--clear-after", type=float, default=30.0, help="seconds before a copied secret is cleared")
    cr.add_argument("--json", action="store_true", help="machine-readable output (no password unless --field password)")
    cr.set_defaults(func=commands.cmd_creds)

    rn = sub.add_parser("renew", help="renew credentials now")
    rn.add_argument("name", nargs="?", help="cluster name (default: all)")
    rn.add_argument("--rotate", action="store_true", help="mint new DB users now (login = \"local\": saved logins keep working)")
    rn.set_defaults(func=commands.cmd_renew)

    rp = sub.add_parser("reset-password", help='a new local password for a cluster (login = "local")')
    rp.add_argument("name", help="cluster name")
    rp.set_defaults(func=commands.cmd_reset_password)

    lg = sub.add_parser("login", help="AWS SSO sign-in (in the browser; device code when headless)")
    lg.add_argument("--no-browser", action="store_true",
                    help="do not open a browser: print a URL and code for any device (device code flow)")
    lg.add_argument("--use-device-code", action="store_true", help="use the device code flow (as `aws sso login`)")
    lg.add_argument("--wait", type=float, default=600.0, help="seconds to wait for the confirmation")
    lg.set_defaults(func=commands.cmd_login)

    dr = sub.add_parser("doctor", help="check each layer in order and name the first broken one")
    dr.add_argument("--report", metavar="FILE", help="write a redacted report for a bug ticket")
    dr.add_argument("--cluster", help="check the path to this cluster (default: the first one)")
    dr.set_defaults(func=commands.cmd_doctor)

    dm = sub.add_parser("daemon", help="run the daemon (logs to stderr and the log file)")
    dm.add_argument("--background", action="store_true", help="log to the file only")
    dm.set_defaults(func=commands.cmd_daemon)

    sub.add_parser("reload", help="re-read the config (refused whole if invalid)").set_defaults(func=commands.cmd_reload)
    sp = sub.add_parser("stop", help="stop the daemon (closes tunnels, revokes leases)")
    sp.add_argument("--wait", type=float, default=commands.STOP_WAIT, help="seconds to wait for it to finish")
    sp.set_defaults(func=commands.cmd_stop)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dbtunneld", description=__doc__.splitlines()[0])
    p.add_argument("--version", action="version", version=f"dbtunneld {__version__}")
    p.add_argument("--config", help="config file (default: the platform config path)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    sub.add_parser("version", help="print the version").set_defaults(func=commands.cmd_version)

    cfg = sub.add_parser("config", help="config file tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    check = cfg_sub.add_parser("check", help="validate a config file; exit 2 listing every problem")
    check.add_argument("path", nargs="?")
    check.set_defaults(func=commands.cmd_config_check)

    it = sub.add_parser("init", help="write or extend config.toml by discovering profiles, clusters, bastion and roles")
    it.add_argument("--no-browser", action="store_true", help="only print the sign-in URL and code")
    it.add_argument("--gui", action="store_true", help="ask in a window (what the tray's Set up… opens), "
                                                        "then start the daemon and connect")
    it.set_defaults(func=commands.cmd_init)

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
    au.set_defaults(func=commands.cmd_autostart, autostart_command="status")
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
    sub.add_parser("tray", help="the tray menu (starts the daemon when none runs)").set_defaults(func=commands.cmd_tray)
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
        code: int = func(args)
        return code
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
    from ..process.client import DaemonNotRunning

    if isinstance(exc, DaemonNotRunning):
        return EXIT_NO_DAEMON
    if isinstance(exc, SignInNeededError):
        return EXIT_SIGN_IN
    if isinstance(exc, (commands.UsageError, UnknownNameError)):
        return EXIT_USAGE
    return EXIT_FAIL


def _log_traceback(exc: BaseException) -> str:
    """Write the traceback to the CLI log (never to the terminal); return the log's path."""
    import logging
    import traceback

    from ..adapters import log as logsetup

    path = commands.user_paths().log_dir / "cli.log"
    try:
        logsetup.setup_logging(path, stderr=False)
        logging.getLogger("dbtunneld.ui.cli").error("unexpected error:\n%s",
                                                 "".join(traceback.format_exception(exc)))
    except OSError:
        return "(no log: the log folder is not writable)"
    return str(path)


if __name__ == "__main__":
    sys.exit(main())
