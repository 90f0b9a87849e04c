"""The `dbtunneld` command line: parses arguments and dispatches to subcommand modules.

Front-end layer: talks to the daemon only through ``client`` (control socket). Errors are one
line plus a hint on stderr; tracebacks go to the log only.

Exit codes: 0 ok; 1 failure at run time; 2 usage or config error; 3 daemon not running;
4 sign-in needed; 5 a tunnel or credential is not healthy.
"""

from __future__ import annotations

import argparse
import sys

from . import __version__
from .errors import ConfigError, DbtunneldError, NeedsUserError, SignInNeededError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_NO_DAEMON, EXIT_SIGN_IN, EXIT_UNHEALTHY = 0, 1, 2, 3, 4, 5


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


def _cmd_sandbox(args: argparse.Namespace) -> int:
    from .sandbox.cli import run_sandbox

    return run_sandbox(args)


def _cmd_autostart(args: argparse.Namespace) -> int:
    from .autostart import run_cli

    return run_cli(args)


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

    sb = sub.add_parser("sandbox", help="run the local stack of real servers (no AWS needed)")
    sb.add_argument("--no-daemon", action="store_true", help="only the servers, not the daemon")
    sb.add_argument("--short-ttl", action="store_true", help="use TTLs of seconds (for demos of renewal)")
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
    except SignInNeededError as exc:
        print(f"dbtunneld: {exc.one_line()}", file=sys.stderr)
        return EXIT_SIGN_IN
    except DbtunneldError as exc:
        print(f"dbtunneld: {exc.one_line()}", file=sys.stderr)
        return EXIT_FAIL
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
