"""Notifications: one per incident until it is resolved, never a storm, and they really reach the
desktop's notification service (a recording org.freedesktop.Notifications on a private bus)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
import subprocess
import sys
import textwrap

import pytest

from dbtunneld.core.model import CredentialState as C, CredentialStatus, DaemonStatus, TunnelState as T, TunnelStatus
from dbtunneld.ui.notify import (EXPIRY_WARNING, FAILED_AFTER, MAX_AT_ONCE, IncidentTracker, Notifier, command_sender,
                              coalesce, dbus_sender, desktop_sender, incidents, pystray_sender)

from helpers.xsession import Desktop, missing_tools

NOW = 1_700_000_000.0


def tunnel(name="orders", state=T.UP, since=NOW - 5, username="v-orders-1", **kw):
    return TunnelStatus(name=name, local_port=13306, state=state, since=since, username=username, **kw)


def snap(*tunnels, aws=C.VALID, aws_expires=NOW + 8 * 3600, vault=C.VALID):
    return DaemonStatus(version="t", pid=1, started_at=0.0, config_path="", log_path="",
                        aws=CredentialStatus("aws", "dev", aws, expires_at=aws_expires),
                        vault=CredentialStatus("vault", "v", vault), tunnels=tuple(tunnels))


# Each case: a sequence of (seconds after NOW, snapshot) and the notice keys expected after each step.
CASES = {
    "healthy: nothing": [
        (0, snap(tunnel()), []),
        (60, snap(tunnel()), []),
    ],
    "a failed tunnel is announced once while it stays down": [
        (0, snap(tunnel()), []),
        (1, snap(tunnel(state=T.FAILED, last_error="host key mismatch")), [("tunnel_failed", "orders")]),
        (2, snap(tunnel(state=T.FAILED, last_error="host key mismatch")), []),
        (3, snap(tunnel(state=T.BACKOFF, since=NOW)), []),                 # flapping is not a new incident
        (4, snap(tunnel(state=T.FAILED)), []),
        (5, snap(tunnel(state=T.UP)), []),                                 # resolved
        (6, snap(tunnel(state=T.FAILED)), [("tunnel_failed", "orders")]),  # a new incident
    ],
    "a short reconnect is not an incident, a long one is": [
        (0, snap(tunnel(state=T.BACKOFF, since=NOW)), []),
        (FAILED_AFTER - 1, snap(tunnel(state=T.BACKOFF, since=NOW)), []),
        (FAILED_AFTER, snap(tunnel(state=T.BACKOFF, since=NOW)), [("tunnel_failed", "orders")]),
        (FAILED_AFTER + 30, snap(tunnel(state=T.RECONNECTING, since=NOW)), []),
    ],
    "sign-in needed once, again after a sign-in": [
        (0, snap(tunnel(state=T.NEEDS_SIGN_IN), aws=C.NEEDS_SIGN_IN), [("sign_in",)]),
        (30, snap(tunnel(state=T.NEEDS_SIGN_IN), aws=C.NEEDS_SIGN_IN), []),
        (60, snap(tunnel(state=T.WAITING_CREDENTIALS), aws=C.ACQUIRING), []),   # not yet resolved
        (61, snap(tunnel(state=T.NEEDS_SIGN_IN), aws=C.NEEDS_SIGN_IN), []),
        (90, snap(tunnel(), aws=C.VALID), []),
        (120, snap(tunnel(state=T.NEEDS_SIGN_IN), aws=C.NEEDS_SIGN_IN), [("sign_in",)]),
    ],
    "sign-in expiring: once per session, not for a fresh one": [
        (0, snap(tunnel(), aws_expires=NOW + EXPIRY_WARNING + 60), []),
        (60, snap(tunnel(), aws_expires=NOW + EXPIRY_WARNING + 60), [("sign_in_expiring", round(NOW + EXPIRY_WARNING + 60))]),
        (300, snap(tunnel(), aws_expires=NOW + EXPIRY_WARNING + 60), []),
        (320, snap(tunnel(), aws_expires=NOW + 8 * 3600), []),            # signed in again
        (EXPIRY_WARNING + 61, snap(tunnel(state=T.NEEDS_SIGN_IN), aws=C.NEEDS_SIGN_IN,
                                   aws_expires=NOW + EXPIRY_WARNING + 60), [("sign_in",)]),
    ],
    "new credentials minted are announced, the first ones are not": [
        (0, snap(tunnel(username="")), []),
        (1, snap(tunnel(username="v-orders-1")), []),
        (2, snap(tunnel(username="v-orders-1")), []),
        (3, snap(tunnel(username="v-orders-2")), [("minted", "orders", "v-orders-2")]),
        (4, snap(tunnel(username="", state=T.STOPPED)), []),
        (5, snap(tunnel(username="v-orders-3")), [("minted", "orders", "v-orders-3")]),
    ],
    "two clusters are separate incidents": [
        (0, snap(tunnel("a", T.FAILED), tunnel("b")), [("tunnel_failed", "a")]),
        (1, snap(tunnel("a", T.FAILED), tunnel("b", T.FAILED)), [("tunnel_failed", "b")]),
        (2, snap(tunnel("a", T.UP), tunnel("b", T.FAILED)), []),
        (3, snap(tunnel("a", T.FAILED), tunnel("b", T.FAILED)), [("tunnel_failed", "a")]),
    ],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_incident_sequence(case):
    tracker = IncidentTracker()
    for step, (dt, status, expected) in enumerate(CASES[case]):
        got = [n.key for n in tracker.observe(status, NOW + dt)]
        assert got == expected, f"{case}, step {step} (t+{dt}): {got} != {expected}"


def test_notices_say_what_to_do_and_carry_no_secret():
    status = snap(tunnel(state=T.FAILED, last_error="port 13306 is in use by pid 42 (nc)",
                         hint="stop that process or pin another local_port"), aws=C.NEEDS_SIGN_IN)
    texts = {n.key[0]: n.title + " " + n.message for n in incidents(status, NOW)}
    assert "Sign in" in texts["sign_in"] and "dbtunneld login" in texts["sign_in"]
    assert "pid 42" in texts["tunnel_failed"] and "pin another local_port" in texts["tunnel_failed"]


def test_many_incidents_at_once_become_one_summary():
    status = snap(*(tunnel(f"c{i}", T.FAILED) for i in range(MAX_AT_ONCE + 3)))
    sent = []
    notifier = Notifier(lambda title, message: sent.append((title, message)))
    notices = notifier.update(status, NOW)
    assert len(notices) == 1 and len(sent) == 1
    assert sent[0][0] == f"dbtunneld: {MAX_AT_ONCE + 3} problems" and "c0 is down" in sent[0][1]
    assert notifier.update(status, NOW + 1) == [] and len(sent) == 1
    assert coalesce(incidents(snap(tunnel("x", T.FAILED)), NOW)) == incidents(snap(tunnel("x", T.FAILED)), NOW)


def test_a_broken_sender_never_raises_and_disabled_sends_nothing():
    def broken(title, message):
        raise OSError("no notification service")

    notifier = Notifier(broken)
    notifier.update(snap(tunnel(state=T.FAILED)), NOW)           # logged, not raised
    quiet = []
    off = Notifier(lambda t, m: quiet.append(t), enabled=False)
    assert off.update(snap(tunnel(state=T.FAILED)), NOW)          # tracked...
    assert quiet == []                                            # ...but not shown


def test_sender_choice():
    class WithNotify:
        HAS_NOTIFICATION = True

        def __init__(self):
            self.got = []

        def notify(self, message, title=None):
            self.got.append((title, message))

    icon = WithNotify()
    desktop_sender(icon, platform="linux")("T", "M")
    assert icon.got == [("T", "M")]

    class NoNotify:
        HAS_NOTIFICATION = False

    assert pystray_sender(NoNotify()) is None
    assert command_sender("linux", which=lambda name: None) is None
    assert command_sender("darwin", which=lambda name: "/usr/bin/" + name) is not None


RECORDER = textwrap.dedent('''
    import json, sys
    import gi
    gi.require_version("Gio", "2.0")
    from gi.repository import Gio, GLib
    XML = """<node><interface name="org.freedesktop.Notifications">
      <method name="Notify"><arg type="s" direction="in"/><arg type="u" direction="in"/>
        <arg type="s" direction="in"/><arg type="s" direction="in"/><arg type="s" direction="in"/>
        <arg type="as" direction="in"/><arg type="a{sv}" direction="in"/><arg type="i" direction="in"/>
        <arg type="u" direction="out"/></method>
      <method name="CloseNotification"><arg type="u" direction="in"/></method>
      <method name="GetCapabilities"><arg type="as" direction="out"/></method>
      <method name="GetServerInformation"><arg type="s" direction="out"/><arg type="s" direction="out"/>
        <arg type="s" direction="out"/><arg type="s" direction="out"/></method>
    </interface></node>"""
    node = Gio.DBusNodeInfo.new_for_xml(XML)
    count = [0]
    def call(conn, sender, path, iface, method, params, invocation):
        if method == "Notify":
            count[0] += 1
            app, _, icon, title, body = params.unpack()[:5]
            print(json.dumps({"app": app, "title": title, "body": body}), flush=True)
            invocation.return_value(GLib.Variant("(u)", (count[0],)))
        elif method == "GetCapabilities":
            invocation.return_value(GLib.Variant("(as)", (["body"],)))
        elif method == "GetServerInformation":
            invocation.return_value(GLib.Variant("(ssss)", ("recorder", "test", "1", "1.2")))
        else:
            invocation.return_value(None)
    def acquired(conn, name):
        print(json.dumps({"ready": name}), flush=True)
    def bus_acquired(conn, name):
        conn.register_object("/org/freedesktop/Notifications", node.interfaces[0], call, None, None)
    Gio.bus_own_name(Gio.BusType.SESSION, "org.freedesktop.Notifications", 0, bus_acquired, acquired, None)
    GLib.MainLoop().run()
''')


def start_recorder(desktop, tmp_path):
    script = tmp_path / "recorder.py"
    script.write_text(RECORDER)
    proc = desktop.spawn("recorder", [sys.executable, str(script)], stdout=subprocess.PIPE)
    ready = json.loads(proc.stdout.readline() or "{}")
    assert ready.get("ready") == "org.freedesktop.Notifications", "the recording service did not start"
    return proc


@pytest.mark.skipif(bool(missing_tools(("dbus-daemon",))), reason="needs dbus-daemon (Debian: dbus)")
def test_notifications_reach_the_desktop_service(tmp_path, monkeypatch):
    pytest.importorskip("gi", reason="needs PyGObject (the tray extra)")
    d = Desktop(tmp_path)
    try:
        d.env = d.base_env()
        d.start_bus()
        recorder = start_recorder(d, tmp_path)
        monkeypatch.setenv("DBUS_SESSION_BUS_ADDRESS", d.bus_address)
        notifier = Notifier(dbus_sender())
        notifier.update(snap(tunnel(state=T.FAILED, last_error="bastion unreachable")), NOW)
        notifier.update(snap(tunnel(state=T.FAILED, last_error="bastion unreachable")), NOW + 1)
        notifier.update(snap(tunnel(state=T.UP)), NOW + 2)
        notifier.update(snap(tunnel(state=T.FAILED, last_error="bastion unreachable")), NOW + 3)
        got = [json.loads(recorder.stdout.readline()) for _ in range(2)]
        assert [g["title"] for g in got] == ["dbtunneld: orders is down"] * 2
        assert got[0]["app"] == "dbtunneld" and "bastion unreachable" in got[0]["body"]
        if command_sender("linux"):                      # notify-send reaches the same service
            command_sender("linux")("via notify-send", "hello")
            assert json.loads(recorder.stdout.readline())["title"] == "via notify-send"
    finally:
        d.stop()
    assert not d.alive()


# ----------------------------------------------------------------------------- macOS: our own sender

def fake_osascript(folder: Path, *, hang: bool = False) -> Path:
    """A stand-in for /usr/bin/osascript. osascript(1): `osascript -e STATEMENT [ARGUMENT ...]`
    compiles STATEMENT and passes the ARGUMENTs to its `on run argv` handler as strings; this one
    records them as JSON (and, with ``hang``, never answers, like a notification stuck on a prompt)."""
    folder.mkdir(parents=True, exist_ok=True)
    script = folder / "osascript"
    script.write_text(f"#!{sys.executable}\n" + textwrap.dedent(f'''
        import json, sys, time
        with open({str(folder / "calls.jsonl")!r}, "a") as f:
            f.write(json.dumps(sys.argv[1:]) + "\\n")
        if {hang!r}:
            time.sleep(60)
        '''))
    script.chmod(0o755)
    return script


def test_macos_notifications_use_our_sender_not_pystrays(tmp_path, monkeypatch):
    class DarwinIcon:                    # pystray's darwin Icon: HAS_NOTIFICATION, osascript, no timeout
        HAS_NOTIFICATION = True

        def __init__(self):
            self.got = []

        def notify(self, message, title=None):
            self.got.append((title, message))

    fake_osascript(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    icon = DarwinIcon()
    desktop_sender(icon, platform="darwin")('dbtunneld: "orders" is down', 'said "no" \\ path')
    assert icon.got == []
    calls = [json.loads(line) for line in (tmp_path / "bin" / "calls.jsonl").read_text().splitlines()]
    assert calls[0][0] == "-e" and "on run argv" in calls[0][1]
    assert calls[0][2:] == ['dbtunneld: "orders" is down', 'said "no" \\ path']   # arguments, not script text


def test_a_hanging_notification_command_is_abandoned_after_the_timeout(tmp_path):
    script = fake_osascript(tmp_path / "bin", hang=True)
    send = command_sender("darwin", which=lambda name: str(script), timeout=0.5)
    notifier = Notifier(send)
    started = time.monotonic()
    notifier.show("dbtunneld: test", "a stuck notification")       # logged, never raised
    assert time.monotonic() - started < 5
