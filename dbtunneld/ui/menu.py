"""The tray menu as data: a pure function from a status snapshot to a tree of frozen items.

``build_menu`` turns a ``model.DaemonStatus`` (or ``None`` when no daemon answers), the real
autostart state and a clock reading into a ``MenuModel``: header lines, one entry per cluster
with its submenu, the global entries, the icon's health and the tooltip. Actions are plain
tuples such as ``("copy", "orders", "password")`` that ``tray`` dispatches; nothing here
imports pystray, so every state combination is testable without a screen.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from datetime import datetime, tzinfo
from typing import Any

from ..core.model import (CredentialState, CredentialStatus, DaemonStatus, Health, TunnelState,
                    TunnelStatus, overall_health)

Action = tuple[Any, ...]
SIGN_IN_WARNING = 600.0          # offer "Sign in…" this long before the AWS session ends
TOOLTIP_MAX = 127                # Windows truncates tray tooltips at 127 characters

DOTS = {
    TunnelState.UP: "●",
    TunnelState.STOPPED: "○",
    TunnelState.CONNECTING: "◐",
    TunnelState.WAITING_CREDENTIALS: "◐",
    TunnelState.RECONNECTING: "◐",
    TunnelState.BACKOFF: "◐",
    TunnelState.NEEDS_SIGN_IN: "▲",
    TunnelState.FAILED: "✖",
}
# Coloured dots where the system always has a colour emoji font (macOS, Windows). Linux menus keep
# the shapes above: a desktop may lack a colour emoji font (this Xvfb test desktop does), and
# GTK / AppIndicator menus take neither colours nor icons per item through pystray.
COLOUR_DOTS = {
    TunnelState.UP: "🟢",
    TunnelState.STOPPED: "⚪",
    TunnelState.CONNECTING: "🟡",
    TunnelState.WAITING_CREDENTIALS: "🟡",
    TunnelState.RECONNECTING: "🟡",
    TunnelState.BACKOFF: "🟠",
    TunnelState.NEEDS_SIGN_IN: "🔴",
    TunnelState.FAILED: "🔴",
}
ERROR_WIDTH = 48                 # characters per menu line: long errors wrap to two, then "…"
ERROR_LINES = 2


def status_dot(state: TunnelState, platform: str = sys.platform) -> str:
    return (COLOUR_DOTS if platform in ("darwin", "win32") else DOTS)[state]


@dataclass(frozen=True)
class MenuItem:
    text: str = ""
    action: Action | None = None
    enabled: bool = True
    checked: bool | None = None      # None: not a check item
    radio: bool = False
    submenu: tuple["MenuItem", ...] = ()
    separator: bool = False


SEPARATOR = MenuItem(separator=True)


def info(text: str) -> MenuItem:
    """A line that only shows something (greyed out, does nothing)."""
    return MenuItem(text, enabled=False)


@dataclass(frozen=True)
class MenuModel:
    items: tuple[MenuItem, ...]
    health: Health
    tooltip: str

    def find(self, *texts: str) -> MenuItem:
        """The item reached by following texts (prefix match per level), for tests and the tray."""
        items: tuple[MenuItem, ...] = self.items
        found: MenuItem | None = None
        for text in texts:
            found = next((i for i in items if not i.separator and i.text.startswith(text)), None)
            if found is None:
                raise KeyError(f"no menu item starting with {text!r} among {[i.text for i in items]}")
            items = found.submenu
        if found is None:
            raise KeyError("name at least one menu item")
        return found


@dataclass(frozen=True)
class ClockReading:
    """A reading of the clock: epoch seconds and the zone used to show times of day."""

    now: float
    tz: tzinfo | None = None


def build_menu(status: DaemonStatus | None, *, autostart: bool | None, clock: ClockReading,
               platform: str = sys.platform, daemon_problem: str = "",
               config_path: str = "", log_path: str = "", connecting: bool = False,
               needs_setup: bool = False) -> MenuModel:
    """The whole menu for one snapshot. ``autostart`` None means unknown or unsupported;
    ``status`` None means no daemon answers (``connecting``: the tray is still reaching it);
    ``needs_setup``: there is no config file yet, so "Set up…" comes first."""
    if status is None and needs_setup:
        return _setup_menu(autostart, config_path, log_path)
    if status is None:
        return _no_daemon_menu(autostart, daemon_problem, config_path, log_path, connecting)
    items = (_header(status, clock) + (SEPARATOR,)
             + tuple(cluster_item(t, clock, platform) for t in status.tunnels)
             + (SEPARATOR,)
             + _global_items(status, autostart, status.config_path or config_path,
                             status.log_path or log_path))
    return MenuModel(items, overall_health(status), tooltip(status, clock))


def _no_daemon_menu(autostart: bool | None, problem: str, config_path: str, log_path: str, connecting: bool) -> MenuModel:
    if connecting:
        head: tuple[MenuItem, ...] = (info("Connecting to the dbtunneld daemon…"),)
    else:
        head = (info("dbtunneld daemon is not running"),) + ((info(_clip(problem, 90)),) if problem else ())
        head += (MenuItem("Start daemon", ("start_daemon",)),)
    items = head + (SEPARATOR,) + _settings_items(autostart, config_path, log_path) + (
        SEPARATOR, MenuItem("Quit (tray only)", ("quit",)))
    tip = "dbtunneld: connecting to the daemon" if connecting else "dbtunneld: daemon not running"
    return MenuModel(items, Health.IDLE if connecting else Health.NEEDS_ACTION, tip)


def _setup_menu(autostart: bool | None, config_path: str, log_path: str) -> MenuModel:
    items = (info("dbtunneld is not set up yet (no config file)"), MenuItem("Set up…", ("setup",)), SEPARATOR,
             *_settings_items(autostart, "", log_path, setup=False), SEPARATOR, MenuItem("Quit (tray only)", ("quit",)))
    return MenuModel(items, Health.NEEDS_ACTION, "dbtunneld: not set up yet")


# ---- header --------------------------------------------------------------------------------

def _header(status: DaemonStatus, clock: ClockReading) -> tuple[MenuItem, ...]:
    lines = []
    if status.aws:
        lines.append(info(credential_line("AWS SSO", status.aws, clock, who=short_identity(status.aws.identity))))
    if status.vault:
        lines.append(info(credential_line("Vault token", status.vault, clock)))
    if not lines:
        lines.append(info(f"dbtunneld {status.version}"))
    if sign_in_wanted(status, clock):
        lines.append(MenuItem("Sign in…", ("sign_in",)))
    return tuple(lines)


def credential_line(label: str, cred: CredentialStatus, clock: ClockReading, who: str = "") -> str:
    state = cred.state
    if state in (CredentialState.VALID, CredentialState.RENEWING):
        text = _who_and_left(who, cred.expires_at, clock)
    elif state == CredentialState.BACKOFF:
        text = "retrying" + _retry_in(cred.next_action_at, clock) + _because(cred.last_error)
    else:
        text = _CRED_TEXT.get(state, state.value) + (_because(cred.last_error) if state == CredentialState.FAILED else "")
    return f"{label}: {text}"


_CRED_TEXT = {
    CredentialState.IDLE: "not signed in",
    CredentialState.ACQUIRING: "signing in…",
    CredentialState.NEEDS_SIGN_IN: "sign-in needed",
    CredentialState.FAILED: "failed",
    CredentialState.REVOKED: "revoked",
}


def _who_and_left(who: str, expires_at: float | None, clock: ClockReading) -> str:
    parts = [who] if who else []
    if expires_at is not None:
        left = expires_at - clock.now
        parts.append(f"{duration(left)} left" if left > 0 else "expired")
    return " · ".join(parts) or "valid"


def short_identity(arn: str) -> str:
    """'arn:aws:sts::1:assumed-role/AWSReservedSSO_Dev_0a1b/alice' -> 'alice (Dev)'."""
    if ":assumed-role/" not in arn:
        return arn.rsplit(":", 1)[-1] if arn.startswith("arn:") else arn
    role, _, session = arn.split(":assumed-role/", 1)[1].partition("/")
    if role.startswith("AWSReservedSSO_"):
        role = role.removeprefix("AWSReservedSSO_").rsplit("_", 1)[0]
    return f"{session} ({role})" if session else role


def sign_in_wanted(status: DaemonStatus, clock: ClockReading) -> bool:
    """A sign-in is needed now, or the AWS session ends within SIGN_IN_WARNING."""
    creds = [c for c in (status.aws, status.vault) if c]
    if any(c.state == CredentialState.NEEDS_SIGN_IN for c in creds):
        return True
    if any(t.state == TunnelState.NEEDS_SIGN_IN for t in status.tunnels):
        return True
    aws = status.aws
    return bool(aws and aws.expires_at is not None and aws.state == CredentialState.VALID
                and aws.expires_at - clock.now <= SIGN_IN_WARNING)


# ---- clusters ------------------------------------------------------------------------------

def cluster_item(t: TunnelStatus, clock: ClockReading, platform: str = sys.platform) -> MenuItem:
    prod = " [PROD]" if t.production else ""
    text = f"{status_dot(t.state, platform)} {t.name}{prod}  127.0.0.1:{t.local_port}  {state_text(t, clock)}"
    return MenuItem(text, submenu=cluster_submenu(t, platform))


def state_text(t: TunnelStatus, clock: ClockReading) -> str:
    s = t.state
    if s == TunnelState.UP and t.role and t.expected_role and t.role != t.expected_role:
        return "up, but read-only (failover?)" if t.expected_role == "writer" else "up (reaches the writer)"
    if s in (TunnelState.UP, TunnelState.RECONNECTING, TunnelState.CONNECTING,
             TunnelState.WAITING_CREDENTIALS):
        return _STATE_TEXT[s] + _since(t.since, clock)
    if s == TunnelState.BACKOFF:
        return "down, next retry" + (_retry_in(t.next_retry_at, clock) or " soon")
    return _STATE_TEXT[s]


_STATE_TEXT = {
    TunnelState.UP: "up",
    TunnelState.STOPPED: "stopped",
    TunnelState.CONNECTING: "connecting",
    TunnelState.WAITING_CREDENTIALS: "waiting for credentials",
    TunnelState.RECONNECTING: "reconnecting",
    TunnelState.BACKOFF: "down",
    TunnelState.NEEDS_SIGN_IN: "sign-in needed",
    TunnelState.FAILED: "failed",
}


def cluster_submenu(t: TunnelStatus, platform: str = sys.platform) -> tuple[MenuItem, ...]:
    name, has_user, running = t.name, bool(t.username), t.state != TunnelState.STOPPED
    return (_problem_lines(t)
            + (MenuItem("Disconnect", ("disconnect", name)) if running else MenuItem("Connect", ("connect", name)),
               MenuItem("Reconnect", ("reconnect", name), enabled=running),
               SEPARATOR,
               MenuItem("Copy username", ("copy", name, "username"), enabled=has_user),
               _copy_password_item(t),
               MenuItem("Copy mysql command", ("copy", name, "mysql"), enabled=has_user),
               MenuItem("Copy URL (no password)", ("copy", name, "url"), enabled=has_user),
               MenuItem(_open_label(platform), ("open_client", name), enabled=has_user),
               SEPARATOR,
               MenuItem("Renew credentials", ("renew", name), enabled=has_user and running))
            + _local_login_items(t))


def _local_login_items(t: TunnelStatus) -> tuple[MenuItem, ...]:
    """login = "local": the copied pair is stable (rotation is invisible), and it can be reset."""
    if t.login != "local":
        return ()
    return (SEPARATOR, info("Local login: saved logins keep working"),
            MenuItem("Reset local password…", ("reset_password", t.name)))


def _problem_lines(t: TunnelStatus) -> tuple[MenuItem, ...]:
    lines = []
    if t.production:
        lines.append(info("Production cluster: copying the password asks first"))
    if t.last_error and t.state != TunnelState.UP:
        error, cut = wrapped("Error: " + t.last_error)
        lines += [info(line) for line in error]
        if t.hint:
            fix, cut_fix = wrapped("Fix: " + t.hint)
            lines += [info(line) for line in fix]
            cut = cut or cut_fix
        if cut:
            lines.append(MenuItem("Show details…", ("show_details", t.name)))
    return tuple(lines) + ((SEPARATOR,) if lines else ())


def wrapped(text: str, width: int = ERROR_WIDTH, max_lines: int = ERROR_LINES) -> tuple[list[str], bool]:
    """``text`` in at most ``max_lines`` lines of ``width`` characters; True when some was cut."""
    lines = textwrap.wrap(" ".join(text.split()), width, break_long_words=True) or [""]
    if len(lines) <= max_lines:
        return lines, False
    kept = lines[:max_lines]
    kept[-1] = _clip(kept[-1] + " " + lines[max_lines], width)
    if not kept[-1].endswith("…"):
        kept[-1] = kept[-1][: width - 1] + "…"
    return kept, True


def details_text(t: TunnelStatus) -> str:
    """The whole error of a cluster, for "Show details…"."""
    parts = [f"{t.name} (127.0.0.1:{t.local_port}): {t.state.value}", t.last_error]
    if t.hint:
        parts.append("Fix: " + t.hint)
    return "\n".join(p for p in parts if p)


def _copy_password_item(t: TunnelStatus) -> MenuItem:
    if t.production:
        return MenuItem("Copy password (production)…", ("confirm_copy", t.name, "password"), enabled=bool(t.username))
    return MenuItem("Copy password", ("copy", t.name, "password"), enabled=bool(t.username))


def _open_label(platform: str) -> str:
    return "Open in Sequel Ace" if platform == "darwin" else "Open in database app"


# ---- global entries ------------------------------------------------------------------------

def _global_items(status: DaemonStatus, autostart: bool | None, config_path: str, log_path: str) -> tuple[MenuItem, ...]:
    startable = any(t.state in (TunnelState.STOPPED, TunnelState.FAILED) for t in status.tunnels)
    return ((MenuItem("Connect all", ("connect_all",), enabled=startable),)
            + _settings_items(autostart, config_path, log_path)
            + (SEPARATOR,
               MenuItem("Quit (tray only)", ("quit",)),
               MenuItem("Quit and disconnect all", ("quit_all",))))


def _settings_items(autostart: bool | None, config_path: str, log_path: str,
                    setup: bool = True) -> tuple[MenuItem, ...]:
    login = (MenuItem("Start at login", ("set_autostart", not autostart), checked=autostart)
             if autostart is not None else MenuItem("Start at login", None, enabled=False, checked=False))
    return (login,) + ((MenuItem("Set up…", ("setup",)),) if setup else ()) + (
            MenuItem("Open config", ("open_path", config_path), enabled=bool(config_path)),
            MenuItem("Open log", ("open_path", log_path), enabled=bool(log_path)))


# ---- tooltip -------------------------------------------------------------------------------

def tooltip(status: DaemonStatus, clock: ClockReading) -> str:
    tunnels = status.tunnels
    up = sum(t.state == TunnelState.UP for t in tunnels)
    off = sum(t.state == TunnelState.STOPPED for t in tunnels)
    parts = [f"dbtunneld: {up}/{len(tunnels)} up" + (f", {off} off" if off and up else "")]
    if sign_in_wanted(status, clock):
        parts.append("sign-in needed" if _needs_sign_in(status) else "sign-in expires soon")
    for t in tunnels:
        if t.state in (TunnelState.FAILED, TunnelState.BACKOFF, TunnelState.RECONNECTING):
            parts.append(f"{t.name} {_STATE_TEXT.get(t.state, 'down')}")
    return _clip("; ".join(parts), TOOLTIP_MAX)


def _needs_sign_in(status: DaemonStatus) -> bool:
    creds = [c for c in (status.aws, status.vault) if c]
    return (any(c.state == CredentialState.NEEDS_SIGN_IN for c in creds)
            or any(t.state == TunnelState.NEEDS_SIGN_IN for t in status.tunnels))


# ---- text helpers --------------------------------------------------------------------------

def duration(seconds: float) -> str:
    """Compact countdown text: 45s, 12m, 3h 05m, 2d 4h."""
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600}h"


def _since(since: float | None, clock: ClockReading) -> str:
    if since is None:
        return ""
    then = datetime.fromtimestamp(since, clock.tz)
    now = datetime.fromtimestamp(clock.now, clock.tz)
    fmt = "%H:%M" if then.date() == now.date() else "%b %d %H:%M"
    return " since " + then.strftime(fmt)


def _retry_in(at: float | None, clock: ClockReading) -> str:
    if at is None:
        return ""
    left = at - clock.now
    return f" in {duration(left)}" if left >= 1 else " now"


def _because(error: str) -> str:
    return f" ({_clip(error, 60)})" if error else ""


def _clip(text: str, limit: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"
