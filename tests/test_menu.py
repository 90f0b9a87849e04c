"""The menu model: every state combination gives the right entries, texts, enabled and checked
flags. Pure: literal snapshots and a fixed clock (UTC), no screen."""

from __future__ import annotations

import itertools
from datetime import datetime, timezone

import pytest

from dbtunneld.ui import menu as menu_mod
from dbtunneld.ui.menu import (SEPARATOR, ClockReading, MenuItem, build_menu, cluster_submenu, duration, short_identity)
from dbtunneld.core.model import (CredentialState as C, CredentialStatus, DaemonStatus, Health, TunnelState as T,
                             TunnelStatus)

NOW = datetime(2026, 3, 2, 14, 30, 0, tzinfo=timezone.utc).timestamp()
CLOCK = ClockReading(NOW, timezone.utc)
ARN = "arn:aws:sts::123456789012:assumed-role/AWSReservedSSO_Developer_0a1b2c3d/alice@example.com"


def tunnel(name="orders", state=T.UP, port=13306, username="v-token-orders-ro-abc", **kw):
    kw.setdefault("since", NOW - 1800)
    return TunnelStatus(name=name, local_port=port, state=state, username=username, **kw)


def status(*tunnels, aws=C.VALID, aws_left=8 * 3600 - 60, vault=C.VALID, vault_left=45 * 60, **kw):
    return DaemonStatus(
        version="0.1.0", pid=42, started_at=NOW - 3600, config_path="/home/u/.config/dbtunneld/config.toml",
        log_path="/home/u/.local/state/dbtunneld/log/dbtunneld.log",
        aws=CredentialStatus("aws", "dev-sso", aws, identity=ARN, expires_at=NOW + aws_left, **kw) if aws else None,
        vault=CredentialStatus("vault", "https://vault:8200", vault, expires_at=NOW + vault_left) if vault else None,
        tunnels=tuple(tunnels))


def menu(st, autostart=False, platform="linux"):
    return build_menu(st, autostart=autostart, clock=CLOCK, platform=platform)


def texts(items):
    return [("---" if i.separator else i.text) for i in items]


def flags(item: MenuItem):
    return item.action, item.enabled, item.checked


# ---- one row per tunnel state: dot, state text, Connect/Disconnect, Reconnect enabled -----------

STATE_ROWS = [
    # state,                dot, state text,                       first action,                reconnect
    (T.UP,                  "●", "up since 14:00",                 ("disconnect", "orders"),    True),
    (T.STOPPED,             "○", "stopped",                        ("connect", "orders"),       False),
    (T.CONNECTING,          "◐", "connecting since 14:00",         ("disconnect", "orders"),    True),
    (T.WAITING_CREDENTIALS, "◐", "waiting for credentials since 14:00", ("disconnect", "orders"), True),
    (T.RECONNECTING,        "◐", "reconnecting since 14:00",       ("disconnect", "orders"),    True),
    (T.BACKOFF,             "◐", "down, next retry in 12s",        ("disconnect", "orders"),    True),
    (T.NEEDS_SIGN_IN,       "▲", "sign-in needed",                 ("disconnect", "orders"),    True),
    (T.FAILED,              "✖", "failed",                         ("disconnect", "orders"),    True),
]


@pytest.mark.parametrize("state,dot,text,first,reconnect", STATE_ROWS, ids=[r[0].value for r in STATE_ROWS])
@pytest.mark.parametrize("production", [False, True], ids=["dev", "prod"])
@pytest.mark.parametrize("has_user", [True, False], ids=["creds", "no-creds"])
def test_cluster_entry_for_every_state(state, dot, text, first, reconnect, production, has_user):
    t = tunnel(state=state, production=production, username="v-orders" if has_user else "",
               next_retry_at=NOW + 12.4 if state == T.BACKOFF else None)
    m = menu(status(t))
    entry = m.find(dot + " orders")
    prod = " [PROD]" if production else ""
    assert entry.text == f"{dot} orders{prod}  127.0.0.1:13306  {text}"
    assert entry.action is None and entry.enabled and entry.submenu
    sub = [i for i in entry.submenu if i.enabled or i.action]            # leave out info lines
    actions = [i.action for i in entry.submenu if not i.separator]
    assert first in actions
    assert m.find(dot, "Reconnect").enabled is reconnect
    copy_pw = ("confirm_copy", "orders", "password") if production else ("copy", "orders", "password")
    expected_copy = [("copy", "orders", "username"), copy_pw, ("copy", "orders", "mysql"),
                     ("copy", "orders", "url"), ("open_client", "orders")]
    copies = [i for i in sub if i.action and i.action[0] in ("copy", "confirm_copy", "open_client")]
    assert [i.action for i in copies] == expected_copy
    assert all(i.enabled is has_user for i in copies), "copy entries need credentials"
    assert m.find(dot, "Renew credentials").enabled is (has_user and state != T.STOPPED)
    pw = m.find(dot, "Copy password")
    assert pw.text == ("Copy password (production)…" if production else "Copy password")
    assert (m.find(dot, "Production cluster").enabled is False) if production else True


def test_submenu_layout_of_a_connected_cluster():
    m = menu(status(tunnel()))
    assert texts(m.find("● orders").submenu) == [
        "Disconnect", "Reconnect", "---", "Copy username", "Copy password", "Copy mysql command",
        "Copy URL (no password)", "Open in database app", "---", "Renew credentials"]
    assert m.find("● orders", "Copy mysql command").action == ("copy", "orders", "mysql")


def test_failed_cluster_shows_error_and_fix():
    t = tunnel(state=T.FAILED, last_error="127.0.0.1:13306 is already in use by pid 9 (nc)",
               hint="stop that process or pin another local_port")
    sub = menu(status(t)).find("✖ orders").submenu
    lines = texts(sub)[:texts(sub).index("---")]            # wrapped to ERROR_WIDTH, nothing cut
    assert lines == ["Error: 127.0.0.1:13306 is already in use by pid", "9 (nc)",
                     "Fix: stop that process or pin another local_port"]
    assert not any(i.enabled for i in sub[:3])
    up = menu(status(tunnel(last_error="old error"))).find("● orders").submenu
    assert not any(i.text.startswith("Error") for i in up), "a healed tunnel shows no stale error"


def test_backoff_without_a_retry_time_and_a_due_retry():
    assert menu(status(tunnel(state=T.BACKOFF))).find("◐").text.endswith("down, next retry soon")
    due = tunnel(state=T.BACKOFF, next_retry_at=NOW - 1)
    assert menu(status(due)).find("◐").text.endswith("down, next retry now")


def test_since_on_another_day_shows_the_date():
    t = tunnel(since=NOW - 2 * 86400)
    assert menu(status(t)).find("●").text.endswith("up since Feb 28 14:30")


def test_sequel_ace_label_on_macos():
    m = menu(status(tunnel()), platform="darwin")
    assert m.find("🟢", "Open in Sequel Ace").action == ("open_client", "orders")     # coloured dot


# ---- header --------------------------------------------------------------------------------

HEADER_ROWS = [
    # aws state, aws seconds left, vault state, lines (without "Sign in…"), sign-in offered
    (C.VALID, 8 * 3600 - 60, C.VALID, ["AWS SSO: alice@example.com (Developer) · 7h 59m left",
                                       "Vault token: 45m left"], False),
    (C.VALID, 540, C.VALID, ["AWS SSO: alice@example.com (Developer) · 9m left", "Vault token: 45m left"], True),
    (C.VALID, -5, C.VALID, ["AWS SSO: alice@example.com (Developer) · expired", "Vault token: 45m left"], True),
    (C.RENEWING, 3600, C.RENEWING, ["AWS SSO: alice@example.com (Developer) · 1h 00m left",
                                    "Vault token: 45m left"], False),
    (C.NEEDS_SIGN_IN, 0, C.IDLE, ["AWS SSO: sign-in needed", "Vault token: not signed in"], True),
    (C.ACQUIRING, 0, C.IDLE, ["AWS SSO: signing in…", "Vault token: not signed in"], False),
    (C.VALID, 3600, C.NEEDS_SIGN_IN, ["AWS SSO: alice@example.com (Developer) · 1h 00m left",
                                      "Vault token: sign-in needed"], True),
    (C.VALID, 3600, C.FAILED, ["AWS SSO: alice@example.com (Developer) · 1h 00m left",
                               "Vault token: failed (permission denied)"], False),
    (C.VALID, 3600, C.REVOKED, ["AWS SSO: alice@example.com (Developer) · 1h 00m left",
                                "Vault token: revoked"], False),
]


@pytest.mark.parametrize("aws,left,vault,lines,sign_in", HEADER_ROWS)
def test_header_lines(aws, left, vault, lines, sign_in):
    st = status(tunnel(), aws=aws, aws_left=left, vault=vault)
    if vault == C.FAILED:
        st = DaemonStatus(**{**st.__dict__, "vault": CredentialStatus("vault", "v", C.FAILED, last_error="permission denied")})
    m = menu(st)
    head = texts(m.items[: m.items.index(SEPARATOR)])
    assert head == lines + (["Sign in…"] if sign_in else [])
    assert all(not i.enabled and i.action is None for i in m.items[:len(lines)]), "header lines are information"
    if sign_in:
        assert flags(m.find("Sign in…")) == (("sign_in",), True, None)


def test_credential_backoff_line_shows_retry_and_error():
    st = status(tunnel(), aws=C.BACKOFF, next_action_at=NOW + 30, last_error="timeout talking to STS")
    assert menu(st).items[0].text == "AWS SSO: retrying in 30s (timeout talking to STS)"


def test_tunnel_needing_sign_in_offers_sign_in():
    m = menu(status(tunnel(state=T.NEEDS_SIGN_IN)))
    assert m.find("Sign in…").action == ("sign_in",)


def test_without_credential_status_the_header_shows_the_version():
    st = status(tunnel(), aws=None, vault=None)
    assert menu(st).items[0].text == "dbtunneld 0.1.0"


# ---- global entries ------------------------------------------------------------------------

@pytest.mark.parametrize("autostart,checked,enabled,action", [
    (True, True, True, ("set_autostart", False)),
    (False, False, True, ("set_autostart", True)),
    (None, False, False, None),
])
def test_start_at_login_shows_the_real_state(autostart, checked, enabled, action):
    item = menu(status(tunnel()), autostart=autostart).find("Start at login")
    assert (item.checked, item.enabled, item.action) == (checked, enabled, action)


def test_global_entries_in_order():
    m = menu(status(tunnel()))
    tail = texts(m.items)[-9:]
    assert tail == ["---", "Connect all", "Start at login", "Set up…", "Open config", "Open log", "---",
                    "Quit (tray only)", "Quit and disconnect all"]
    assert m.find("Set up…").action == ("setup",)                 # re-running setup adds clusters
    assert m.find("Open config").action == ("open_path", "/home/u/.config/dbtunneld/config.toml")
    assert m.find("Open log").action == ("open_path", "/home/u/.local/state/dbtunneld/log/dbtunneld.log")
    assert m.find("Quit (tray only)").action == ("quit",)
    assert m.find("Quit and disconnect all").action == ("quit_all",)


@pytest.mark.parametrize("states,autoconnect,enabled", [
    ((T.UP,), (True,), False),
    ((T.STOPPED,), (True,), True),
    ((T.FAILED,), (True,), True),
    ((T.STOPPED,), (False,), True),             # every cluster, as `connect --all` (not only autoconnect)
    ((T.UP, T.STOPPED), (True, False), True),
    ((T.UP, T.STOPPED), (True, True), True),
    ((T.UP, T.CONNECTING), (False, False), False),
    ((), (), False),
])
def test_connect_all_is_enabled_when_any_cluster_is_down(states, autoconnect, enabled):
    ts = [tunnel(f"c{i}", s, 13306 + i, autoconnect=a) for i, (s, a) in enumerate(zip(states, autoconnect))]
    item = menu(status(*ts)).find("Connect all")
    assert (item.action, item.enabled) == (("connect_all",), enabled)


def test_one_entry_per_cluster_in_config_order():
    ts = [tunnel("orders", T.UP, 13306), tunnel("billing", T.STOPPED, 13307), tunnel("audit", T.FAILED, 13308)]
    m = menu(status(*ts))
    clusters = [i.text.split("  ")[0] for i in m.items if i.submenu]
    assert clusters == ["● orders", "○ billing", "✖ audit"]


# ---- icon and tooltip ----------------------------------------------------------------------

ICON_ROWS = [
    ((), C.VALID, Health.IDLE, "dbtunneld: 0/0 up"),
    ((T.STOPPED,), C.VALID, Health.IDLE, "dbtunneld: 0/1 up"),
    ((T.UP, T.UP), C.VALID, Health.OK, "dbtunneld: 2/2 up"),
    ((T.UP, T.RECONNECTING), C.VALID, Health.DEGRADED, "dbtunneld: 1/2 up; c1 reconnecting"),
    ((T.UP, T.BACKOFF), C.VALID, Health.DEGRADED, "dbtunneld: 1/2 up; c1 down"),
    ((T.UP, T.FAILED), C.VALID, Health.NEEDS_ACTION, "dbtunneld: 1/2 up; c1 failed"),
    ((T.NEEDS_SIGN_IN,), C.NEEDS_SIGN_IN, Health.NEEDS_ACTION, "dbtunneld: 0/1 up; sign-in needed"),
]


@pytest.mark.parametrize("states,aws,health,tip", ICON_ROWS)
def test_icon_is_the_worst_state_and_the_tooltip_summarises(states, aws, health, tip):
    ts = [tunnel(f"c{i}", s, 13306 + i) for i, s in enumerate(states)]
    m = menu(status(*ts, aws=aws))
    assert m.health is health
    assert m.tooltip == tip


def test_tooltip_mentions_an_expiring_sign_in_and_fits_windows():
    m = menu(status(tunnel(), aws_left=300))
    assert m.tooltip == "dbtunneld: 1/1 up; sign-in expires soon"
    many = menu(status(*(tunnel(f"cluster-with-a-long-name-{i}", T.FAILED, 13306 + i) for i in range(9))))
    assert len(many.tooltip) <= 127 and many.tooltip.endswith("…")


# ---- no daemon -----------------------------------------------------------------------------

def test_menu_when_no_daemon_answers():
    m = build_menu(None, autostart=True, clock=CLOCK, daemon_problem="no dbtunneld daemon is listening on /x",
                   config_path="/c.toml", log_path="/l.log")
    assert texts(m.items) == ["dbtunneld daemon is not running", "no dbtunneld daemon is listening on /x",
                              "Start daemon", "---", "Start at login", "Set up…", "Open config", "Open log",
                              "---", "Quit (tray only)"]
    assert m.health is Health.NEEDS_ACTION and "not running" in m.tooltip
    assert m.find("Start daemon").action == ("start_daemon",)
    assert m.find("Start at login").checked is True
    assert m.find("Open config").action == ("open_path", "/c.toml")


def test_menu_without_a_config_offers_set_up_first():
    m = build_menu(None, autostart=False, clock=CLOCK, daemon_problem="config.toml: file not found",
                   config_path="/c.toml", log_path="/l.log", needs_setup=True)
    assert texts(m.items)[:3] == ["dbtunneld is not set up yet (no config file)", "Set up…", "---"]
    assert m.items[1].action == ("setup",) and m.items[1].enabled
    assert texts(m.items).count("Set up…") == 1 and "Start daemon" not in texts(m.items)
    assert m.find("Open config").enabled is False                  # nothing to open yet
    assert m.health is Health.NEEDS_ACTION and m.tooltip == "dbtunneld: not set up yet"


# ---- invariants over every combination ------------------------------------------------------

def test_invariants_over_all_combinations():
    """Every combination: actions are hashable data, info lines do nothing, no secret leaks in."""
    count = 0
    for state, prod, aws, vault, auto in itertools.product(T, (False, True), C, C, (True, False, None)):
        t = tunnel(state=state, production=prod, next_retry_at=NOW + 5)
        m = build_menu(status(t, aws=aws, vault=vault), autostart=auto, clock=CLOCK)
        for item in _walk(m.items):
            count += 1
            hash(item)
            assert not (item.separator and (item.text or item.action or item.submenu))
            assert not (item.action and item.submenu), item
            if item.checked is not None:
                assert item.text == "Start at login"
            assert "password=" not in item.text and ":pw@" not in item.text
        assert m.health in Health and len(m.tooltip) <= 127
    assert count > 10_000


def _walk(items):
    for i in items:
        yield i
        yield from _walk(i.submenu)


def test_find_reports_what_exists():
    m = menu(status(tunnel()))
    with pytest.raises(KeyError, match="Connect all"):
        m.find("No such entry")


@pytest.mark.parametrize("seconds,text", [(-3, "0s"), (0, "0s"), (59, "59s"), (60, "1m"), (3599, "59m"),
                                          (3600, "1h 00m"), (3 * 3600 + 5 * 60, "3h 05m"), (86400, "1d 0h"),
                                          (2 * 86400 + 4 * 3600 + 59, "2d 4h")])
def test_duration_text(seconds, text):
    assert duration(seconds) == text


@pytest.mark.parametrize("arn,text", [
    (ARN, "alice@example.com (Developer)"),
    ("arn:aws:sts::1:assumed-role/db-dev/bob", "bob (db-dev)"),
    ("arn:aws:iam::1:user/carol", "user/carol"),
    ("", ""),
])
def test_short_identity(arn, text):
    assert short_identity(arn) == text


def test_menu_while_connecting_to_the_daemon():
    m = build_menu(None, autostart=False, clock=CLOCK, connecting=True)
    assert texts(m.items)[:2] == ["Connecting to the dbtunneld daemon…", "---"]
    assert m.health is Health.IDLE
    with pytest.raises(KeyError):
        m.find("Start daemon")


def test_a_long_error_wraps_to_two_lines_with_fix_and_show_details():
    error = "ssm: StartSession failed: " + "the target is not connected to Session Manager " * 4
    t = tunnel("orders", T.FAILED, 13306)
    t = TunnelStatus(t.name, t.local_port, T.FAILED, last_error=error, hint="start the SSM agent on the bastion")
    sub = menu(status(t)).find("✖ orders").submenu
    texts = [i.text for i in sub if not i.separator]
    assert texts[0].startswith("Error: ssm: StartSession failed") and texts[1].endswith("…")
    assert all(len(x) <= menu_mod.ERROR_WIDTH for x in texts[:3])
    assert texts[2] == "Fix: start the SSM agent on the bastion"
    details = next(i for i in sub if i.text == "Show details…")
    assert details.action == ("show_details", "orders")
    assert error.strip() in " ".join(menu_mod.details_text(t).split()) and "Fix: start the SSM" in menu_mod.details_text(t)
    short = TunnelStatus("orders", 13306, T.FAILED, last_error="refused", hint="retry")
    assert "Show details…" not in [i.text for i in menu(status(short)).find("✖ orders").submenu]


def test_icon_and_tooltip_show_a_cluster_turned_off():
    both = menu(status(tunnel("orders", T.UP, 13306), tunnel("billing", T.UP, 13307)))
    assert (both.health, both.tooltip) == (Health.OK, "dbtunneld: 2/2 up")
    one_off = menu(status(tunnel("orders", T.UP, 13306), tunnel("billing", T.STOPPED, 13307)))
    assert (one_off.health, one_off.tooltip) == (Health.PARTIAL, "dbtunneld: 1/2 up, 1 off")
    all_off = menu(status(tunnel("orders", T.STOPPED, 13306)))
    assert all_off.health == Health.IDLE


def test_linux_dots_keep_shapes_and_macos_windows_get_colour():
    assert menu_mod.status_dot(T.UP, "linux") == "●" and menu_mod.status_dot(T.FAILED, "linux") == "✖"
    assert [menu_mod.status_dot(s, "darwin") for s in (T.UP, T.BACKOFF, T.FAILED, T.STOPPED)] == ["🟢", "🟠", "🔴", "⚪"]


def test_local_login_row_says_saved_logins_keep_working_and_offers_a_reset():
    local = cluster_submenu(tunnel(login="local"))
    assert "Local login: saved logins keep working" in texts(local)
    reset = next(i for i in local if i.text == "Reset local password…")
    assert reset.action == ("reset_password", "orders")
    lease = cluster_submenu(tunnel(login="lease"))
    assert "Reset local password…" not in texts(lease) and not any("saved logins" in t for t in texts(lease))
