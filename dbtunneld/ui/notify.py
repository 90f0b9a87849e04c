"""Desktop notifications: one per incident, never a storm.

``incidents(status, now)`` says which incidents hold in a snapshot (a tunnel failed, sign-in
needed, the AWS sign-in expires within 10 minutes); ``IncidentTracker`` remembers which were
announced and announces each again only after it was resolved (a failed tunnel came back up, the
user signed in), plus the events it derives from consecutive snapshots (new DB credentials were
minted). ``Notifier`` sends what the tracker yields through one sender: pystray's ``notify``
where the backend supports it (not on macOS), else the desktop's service (org.freedesktop.
Notifications over D-Bus, ``notify-send``, or ``osascript`` on macOS). Every command runs with a
timeout. More than a few at once become one summary.

macOS: pystray's darwin ``notify`` runs ``osascript`` with the text pasted into the script and no
timeout; ours passes the text as arguments (``on run argv``) and gives up after NOTIFY_TIMEOUT.
Either way macOS shows the notice as coming from "Script Editor" and drops it when Script
Editor's notifications are off in System Settings > Notifications.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
from dataclasses import dataclass
from typing import Any, Callable, Iterable

from ..core.model import CredentialState, DaemonStatus, TunnelState, TunnelStatus

log = logging.getLogger(__name__)

EXPIRY_WARNING = 600.0       # warn this long before the AWS sign-in ends
FAILED_AFTER = 60.0          # a tunnel retrying for this long counts as failed
MAX_AT_ONCE = 3              # more notices than this in one update become one summary
NOTIFY_TIMEOUT = 5.0         # a notification command that takes longer is abandoned

Sender = Callable[[str, str], None]          # (title, message)


@dataclass(frozen=True)
class Notice:
    key: tuple[Any, ...]
    title: str
    message: str


# ----------------------------------------------------------------------------- incidents (pure)

def incidents(status: DaemonStatus, now: float) -> list[Notice]:
    """Incidents that hold in this snapshot."""
    found = []
    if needs_sign_in(status):
        found.append(Notice(("sign_in",), "dbtunneld: sign-in needed",
                            "Your AWS sign-in has ended. Choose 'Sign in…' in the tray menu "
                            "or run `dbtunneld login`."))
    elif (expires_at := expiring_at(status, now)) is not None:
        left = int((expires_at - now) // 60)
        found.append(Notice(("sign_in_expiring", round(expires_at)), "dbtunneld: sign-in expires soon",
                            f"Your AWS sign-in ends in {max(left, 1)} min. Choose 'Sign in…' "
                            "in the tray menu to stay connected."))
    found += [_failed_notice(t) for t in status.tunnels if tunnel_failed(t, now)]
    found += [_failover_notice(t) for t in status.tunnels if writer_read_only(t)]
    return found


def writer_read_only(t: TunnelStatus) -> bool:
    """A writer port whose server says it is read-only (an Aurora failover, seen by the probe)."""
    return t.expected_role == "writer" and t.role == "reader" and t.state == TunnelState.UP


def _failover_notice(t: TunnelStatus) -> Notice:
    return Notice(("failover", t.name), f"dbtunneld: {t.name} writer is read-only",
                  f"The writer endpoint of {t.name} answered read-only (an Aurora failover?). dbtunneld "
                  f"rebuilt the tunnel on 127.0.0.1:{t.local_port}; writes fail until the new writer answers.")


def needs_sign_in(status: DaemonStatus) -> bool:
    creds = [c for c in (status.aws, status.vault) if c]
    return (any(c.state == CredentialState.NEEDS_SIGN_IN for c in creds)
            or any(t.state == TunnelState.NEEDS_SIGN_IN for t in status.tunnels))


def expiring_at(status: DaemonStatus, now: float) -> float | None:
    aws = status.aws
    if aws is None or aws.expires_at is None or aws.state not in (CredentialState.VALID, CredentialState.RENEWING):
        return None
    return aws.expires_at if 0 < aws.expires_at - now <= EXPIRY_WARNING else None


def tunnel_failed(t: TunnelStatus, now: float) -> bool:
    if t.state == TunnelState.FAILED:
        return True
    return t.state == TunnelState.BACKOFF and t.since is not None and now - t.since >= FAILED_AFTER


def _failed_notice(t: TunnelStatus) -> Notice:
    detail = t.last_error or "the tunnel is down"
    fix = f" {t.hint}" if t.hint else ""
    return Notice(("tunnel_failed", t.name), f"dbtunneld: {t.name} is down", f"{detail}.{fix}".replace("..", "."))


def resolved(key: tuple[Any, ...], status: DaemonStatus, now: float) -> bool:
    """Whether an announced incident is over (so that a new occurrence is announced again)."""
    kind = key[0]
    if kind == "tunnel_failed":
        t = next((t for t in status.tunnels if t.name == key[1]), None)
        return t is None or t.state in (TunnelState.UP, TunnelState.STOPPED)
    if kind == "failover":
        t = next((t for t in status.tunnels if t.name == key[1]), None)
        return t is None or t.role == "writer"
    if kind == "sign_in":
        return not needs_sign_in(status) and (
            status.aws is None or status.aws.state in (CredentialState.VALID, CredentialState.RENEWING))
    return key not in {n.key for n in incidents(status, now)}


class IncidentTracker:
    """Which notices to show for each new snapshot: new incidents and minted credentials."""

    def __init__(self) -> None:
        self._open: set[tuple[Any, ...]] = set()
        self._users: dict[str, str] = {}

    def observe(self, status: DaemonStatus, now: float) -> list[Notice]:
        self._open = {k for k in self._open if not resolved(k, status, now)}
        fresh = [n for n in incidents(status, now) if n.key not in self._open]
        self._open |= {n.key for n in fresh}
        return fresh + self._minted(status)

    def _minted(self, status: DaemonStatus) -> list[Notice]:
        notices = []
        for t in status.tunnels:
            before = self._users.get(t.name, "")
            if t.username and before and t.username != before:
                notices.append(Notice(("minted", t.name, t.username), f"dbtunneld: new credentials for {t.name}",
                                      f"{t.name} now uses database user {t.username}. Copy the new password "
                                      "from the tray menu if a client asks for it."))
            if t.username:
                self._users[t.name] = t.username
        return notices

    @property
    def open(self) -> frozenset[tuple[Any, ...]]:
        return frozenset(self._open)


def coalesce(notices: list[Notice]) -> list[Notice]:
    """At most MAX_AT_ONCE notices; more become one summary."""
    if len(notices) <= MAX_AT_ONCE:
        return notices
    titles = "; ".join(n.title.removeprefix("dbtunneld: ") for n in notices)
    return [Notice(("summary",), f"dbtunneld: {len(notices)} problems", titles[:240])]


# ----------------------------------------------------------------------------- sending

class Notifier:
    """Turns snapshots into notifications through one sender; a failing sender is logged once."""

    def __init__(self, send: Sender | None, enabled: bool = True) -> None:
        self.send = send
        self.enabled = enabled and send is not None
        self.tracker = IncidentTracker()
        self._send_failed = False

    def update(self, status: DaemonStatus, now: float) -> list[Notice]:
        notices = coalesce(self.tracker.observe(status, now))
        if self.enabled:
            for n in notices:
                self.show(n.title, n.message)
        return notices

    def show(self, title: str, message: str) -> None:
        log.info("notification: %s: %s", title, message)
        try:
            if self.send is None:
                raise TypeError("no desktop notification sender")
            self.send(title, message)
        except Exception as exc:   # a notification must never take the tray down
            if not self._send_failed:
                log.warning("could not show a notification (%s); later failures are not logged", exc)
            self._send_failed = True


def pystray_sender(icon: Any) -> Sender | None:
    """pystray's own notifications, when its backend has them."""
    if not getattr(icon, "HAS_NOTIFICATION", False):
        return None
    return lambda title, message: icon.notify(message, title)


def dbus_sender(app_name: str = "dbtunneld") -> Sender | None:
    """org.freedesktop.Notifications over the session bus via PyGObject (None without it)."""
    try:
        import gi

        gi.require_version("Gio", "2.0")
        from gi.repository import Gio, GLib
    except (ImportError, ValueError):
        return None

    def send(title: str, message: str) -> None:
        bus = Gio.bus_get_sync(Gio.BusType.SESSION, None)
        args = GLib.Variant("(susssasa{sv}i)", (app_name, 0, "network-server", title, message, [], {}, -1))
        bus.call_sync("org.freedesktop.Notifications", "/org/freedesktop/Notifications",
                      "org.freedesktop.Notifications", "Notify", args, GLib.VariantType("(u)"),
                      Gio.DBusCallFlags.NONE, 5000, None)

    return send


def command_sender(platform: str = sys.platform, which: Callable[[str], str | None] = shutil.which,
                   timeout: float = NOTIFY_TIMEOUT) -> Sender | None:
    """notify-send (Linux) or osascript (macOS), run with a timeout; None when neither exists."""
    osascript = which("osascript") if platform == "darwin" else None
    if osascript:
        script = "on run argv\ndisplay notification (item 2 of argv) with title (item 1 of argv)\nend run"
        return lambda title, message: _run([osascript, "-e", script, title, message], timeout)
    notify_send = which("notify-send")
    if notify_send:
        return lambda title, message: _run([notify_send, "--app-name=dbtunneld", title, message], timeout)
    return None


def _run(argv: list[str], timeout: float = NOTIFY_TIMEOUT) -> None:
    subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                   timeout=timeout, check=True)


def first_sender(candidates: Iterable[Callable[[], Sender | None]]) -> Sender | None:
    for make in candidates:
        sender = make()
        if sender is not None:
            return sender
    return None


def desktop_sender(icon: Any = None, platform: str = sys.platform) -> Sender | None:
    """The best way to notify here: pystray's (not on macOS), then D-Bus (Linux), then a command."""
    candidates = [lambda: pystray_sender(icon) if icon is not None and platform != "darwin" else None]
    if platform.startswith("linux"):
        candidates.append(dbus_sender)
    candidates.append(lambda: command_sender(platform))
    return first_sender(candidates)
