"""Supervisor orchestration with scripted units: connect/disconnect, creds, reconcile order, events."""

from __future__ import annotations

import logging
import threading
import time

import pytest

import fake_units as F
from dbtunneld.core import errors
from dbtunneld.core.config import parse_config
from dbtunneld.core.model import TunnelState
from dbtunneld.core.paths import default_paths
from dbtunneld.core.timing import FakeClock
from dbtunneld.engine.engine_loop import EngineLoop
from dbtunneld.engine.status_publisher import StatusPublisher
from dbtunneld.engine.supervisor import Supervisor, connection_strings
from dbtunneld.engine.wake import WakeDetector
from dbtunneld.process.daemon import Daemon, Factories


def cfg(clusters, vault="http://127.0.0.1:8200"):
    return parse_config(F.config_text(clusters, vault), "test.toml")


@pytest.fixture
def events():
    return []


@pytest.fixture
def make(tmp_path, events):
    made = []

    def _make(clusters, autoconnect=True, engine_factory=F.engine_factory, **kw):
        sup = Supervisor(cfg(clusters), default_paths({"DBTUNNELD_HOME": str(tmp_path)}),
                         engine_factory=engine_factory, tunnel_factory=F.tunnel_factory,
                         on_event=lambda e, d: events.append((e, d)), **kw)
        sup.start(autoconnect=autoconnect)
        made.append(sup)
        F.LOG.clear()
        return sup

    yield _make
    for sup in made:
        sup.stop(5)


def states(sup):
    return {t.name: t.state for t in sup.status().tunnels}


def test_autoconnect_at_start(make):
    sup = make([("orders", 13306, True), ("billing", 13307, False)])
    assert states(sup) == {"orders": TunnelState.UP, "billing": TunnelState.STOPPED}
    st = {t.name: t for t in sup.status().tunnels}
    assert st["orders"].username.startswith("v-orders-") and st["orders"].autoconnect
    assert st["billing"].username == ""


def test_connect_waits_and_reports(make):
    sup = make([("orders", 13306, False)])
    [t] = sup.connect(["orders"], wait=5)
    assert t["state"] == "up" and t["username"].startswith("v-orders-") and t["local_port"] == 13306
    assert F.LOG == [("want", "orders"), ("tunnel-start", "orders")]


def test_connect_unknown_name(make):
    sup = make([("orders", 13306, False)])
    with pytest.raises(errors.UnknownNameError) as info:
        sup.connect(["nope"])
    assert "orders" in info.value.message


def test_failed_tunnel_is_reported_not_raised(make):
    sup = make([("busy1", 13306, False)])
    [t] = sup.connect(["busy1"], wait=5)
    assert t["state"] == "failed" and "13306" in t["last_error"]


def test_disconnect_stops_tunnel_before_revoking(make):
    sup = make([("orders", 13306, True), ("billing", 13307, True)])
    assert sup.disconnect(["orders"]) == ["orders"]
    assert F.LOG == [("tunnel-stop", "orders"), ("revoke", "orders")]
    assert states(sup) == {"orders": TunnelState.STOPPED, "billing": TunnelState.UP}
    assert sorted(sup.disconnect(None)) == ["billing"]


def test_creds_hide_the_password_unless_asked(make):
    sup = make([("orders", 13306, True)])
    c = sup.creds("orders")
    assert "password" not in c and c["username"].startswith("v-orders-") and c["port"] == 13306
    assert c["mysql"] == f"mysql -h 127.0.0.1 -P 13306 -u {c['username']} -p"
    assert "secret-pw" not in repr(c)
    assert sup.creds("orders", "password")["password"].startswith("secret-pw-")


def test_creds_of_a_disconnected_cluster_say_how_to_connect(make):
    sup = make([("orders", 13306, False)])
    with pytest.raises(errors.NeedsUserError) as info:
        sup.creds("orders")
    assert "dbtunneld connect orders" in info.value.hint


def test_creds_report_sign_in_needed(make):
    sup = make([("orders", 13306, True)])
    sup._engine.creds.clear()
    sup._engine.signed_in = False
    with pytest.raises(errors.SignInNeededError):
        sup.creds("orders", wait=5)


def test_connection_strings_quote_and_never_hold_a_password():
    s = connection_strings(13306, "v-token-app ro", "app db")
    assert s["mysql"] == "mysql -h 127.0.0.1 -P 13306 -u 'v-token-app ro' -p 'app db'"
    assert s["url"] == "mysql://v-token-app%20ro@127.0.0.1:13306/app%20db"
    assert s["jdbc"] == "jdbc:mysql://127.0.0.1:13306/app%20db?user=v-token-app%20ro"


def test_reload_reconciles_removed_first(make):
    sup = make([("a", 13306, True), ("b", 13307, True), ("c", 13308, False)])
    tunnel_a = sup._slots["a"].tunnel
    # a unchanged, b's port changes (restart, stays connected), c removed, d added with autoconnect
    summary = sup.reload(cfg([("a", 13306, True), ("b", 13309, True), ("d", 13307, True)]))
    assert summary == {"kept": ["a"], "stopped": ["c"], "restarted": ["b"], "started": ["d"]}
    assert sup._slots["a"].tunnel is tunnel_a
    first_start = next(i for i, e in enumerate(F.LOG) if e[0] in ("want", "tunnel-start"))
    assert all(e[0] in ("tunnel-stop", "revoke") for e in F.LOG[:first_start])
    assert ("tunnel-stop", "b") in F.LOG[:first_start]        # 13307 freed before d takes it
    assert states(sup) == {"a": TunnelState.UP, "b": TunnelState.UP, "d": TunnelState.UP}
    assert sup.status().tunnels[1].local_port == 13309


def test_reload_keeps_a_disconnected_changed_cluster_disconnected(make):
    sup = make([("a", 13306, False)])
    sup.reload(cfg([("a", 13310, False)]))
    assert states(sup) == {"a": TunnelState.STOPPED}
    assert not any(e[0] == "revoke" for e in F.LOG)


def test_reload_with_new_vault_restarts_everything(make):
    sup = make([("a", 13306, True), ("b", 13307, False)])
    old_engine = sup._engine
    summary = sup.reload(cfg([("a", 13306, True), ("b", 13307, False)], vault="http://127.0.0.1:8300"))
    assert summary["restarted"] == ["a", "b"] and old_engine.stopped and old_engine.revoked == ["a"]
    assert sup._engine is not old_engine and states(sup)["a"] == TunnelState.UP


def test_stop_closes_tunnels_then_revokes(make):
    sup = make([("a", 13306, True), ("b", 13307, True)])
    engine = sup._engine
    sup.stop(5)
    stops = [i for i, e in enumerate(F.LOG) if e[0] == "tunnel-stop"]
    revokes = [i for i, e in enumerate(F.LOG) if e[0] == "revoke"]
    assert len(stops) == 2 and sorted(engine.revoked) == ["a", "b"] and max(stops) < min(revokes)
    with pytest.raises(errors.NeedsUserError):
        sup.connect(["a"])


def test_status_events_follow_changes(make, events):
    sup = make([("a", 13306, False)])
    sup._publisher.publish_if_changed()
    n = len(events)
    sup._publisher.publish_if_changed()
    assert len(events) == n                           # nothing changed: no event
    sup.connect(["a"])
    sup._publisher.publish_if_changed()
    assert events[-1][0] == "status" and events[-1][1]["tunnels"][0]["state"] == "up"
    assert events[-1][1]["health"] == "ok"
    assert ("credentials", {"name": "a"}) in events


def test_publisher_runs_on_poke_and_stops():
    """The publisher is a task on the engine loop (no thread of its own): a poke publishes at once
    (its fallback poll is a minute away), stop ends the task."""
    got, snap = [], {"n": 0}
    published = threading.Event()

    def emit(event, data):
        got.append(data)
        if data == {"n": 1}:
            published.set()

    with EngineLoop() as loop:
        before = threading.active_count()
        pub = StatusPublisher(lambda: dict(snap), emit, interval=60)
        pub.start(loop)
        snap["n"] = 1
        pub.poke()
        assert published.wait(5), got
        assert threading.active_count() - before <= 1      # a worker of the loop's pool at most
        pub.stop()
        assert not pub.running


def test_reconnect_rebuilds_connected_tunnels_only(make):
    sup = make([("a", 13306, True), ("b", 13307, False)])
    assert sup.reconnect(None) == ["a"]
    assert {t.name: t.reconnects for t in sup.status().tunnels} == {"a": 1, "b": 0}
    with pytest.raises(errors.NeedsUserError) as info:
        sup.reconnect(["b"])
    assert "dbtunneld connect b" in info.value.hint


def test_engine_events_wake_the_waiting_tunnels(make):
    sup = make([("a", 13306, True), ("b", 13307, True), ("c", 13308, False)])
    checks = lambda: {n: s.tunnel.checks for n, s in sup._slots.items()}     # noqa: E731
    sup._engine_event("credentials", {"kind": "db.minted", "name": "a"})
    assert checks() == {"a": 1, "b": 0, "c": 0}
    sup._engine_event("credentials", {"kind": "sso.signed_in", "name": "dev"})
    assert checks() == {"a": 2, "b": 1, "c": 0}
    sup._engine_event("credentials", {"kind": "db.revoked", "name": "a"})
    assert checks() == {"a": 2, "b": 1, "c": 0}


# ---- sleep/wake

class Clocks(FakeClock):
    """The engine's fake clock; a sleep moves only the wall clock."""

    def __init__(self):
        super().__init__(1_700_000_000.0)

    def sleep(self, seconds: float):
        self.advance(5)
        self.jump_wall(seconds)


class CheckableEngine(F.FakeEngine):
    """A fake engine that can re-check its expiries, like ``EngineAdapter.check_now``."""

    def __init__(self, *args):
        super().__init__(*args)
        self.checks = 0

    def check_now(self):
        self.checks += 1


@pytest.fixture
def clocks():
    return Clocks()


@pytest.fixture
def woken(make, clocks):
    """A supervisor whose wake detector runs on fake clocks (its own thread would poll once an hour)."""
    def _woken(clusters):
        wake = WakeDetector(clock=clocks, tick=1e9, threshold=10)   # its thread never polls by itself
        return make(clusters, engine_factory=CheckableEngine, wake=wake), wake
    return _woken


def checks(sup):
    return {n: s.tunnel.checks for n, s in sup._slots.items()}


def test_a_wake_checks_every_connected_tunnel_and_the_engine(woken, clocks, caplog):
    sup, wake = woken([("a", 13306, True), ("b", 13307, True), ("c", 13308, False)])
    clocks.sleep(0)
    assert wake.poll() is None and checks(sup) == {"a": 0, "b": 0, "c": 0}
    clocks.sleep(3600)
    with caplog.at_level(logging.INFO, logger="dbtunneld.engine.wake"):
        assert wake.poll() == 3600
    assert checks(sup) == {"a": 1, "b": 1, "c": 0} and sup._engine.checks == 1
    assert [r.getMessage() for r in caplog.records if "clock jumped" in r.getMessage()] == [
        "clock jumped +3600 s (sleep/wake or clock change): checking every tunnel now"]


def test_units_follow_connect_disconnect_and_reload(woken, clocks):
    sup, wake = woken([("a", 13306, True), ("b", 13307, False), ("c", 13308, True)])
    sup.connect(["b"])
    sup.disconnect(["a"])
    old_c = sup._slots["c"].tunnel
    sup.reload(cfg([("a", 13306, True), ("b", 13307, False), ("c", 13310, True)]))   # c restarts
    clocks.sleep(60)
    wake.poll()
    assert checks(sup) == {"a": 0, "b": 1, "c": 1} and old_c.checks == 0
    old_engine = sup._engine
    sup.reload(cfg([("b", 13307, False)], vault="http://127.0.0.1:8300"))          # everything restarts
    clocks.sleep(60)
    wake.poll()
    assert checks(sup) == {"b": 1} and sup._engine.checks == 1 and old_engine.checks == 1


def test_the_supervisor_starts_and_stops_its_detector(make):
    sup = make([("a", 13306, True)])
    assert sup._wake.running and sup._wake in sup.scheduler   # a unit of the engine's schedule
    assert sup._wake._tick >= 5                       # an idle daemon wakes up for it every few seconds only
    sup.stop(5)
    assert not sup._wake.running and sup._wake not in sup.scheduler


def detectors(sup):
    return [u for u in sup.scheduler.units() if isinstance(u, WakeDetector)]


def test_the_daemon_runs_one_detector_and_ends_it(tmp_path):
    """The real ``Daemon`` (scripted units): one detector unit while it serves, across a reload; none after."""
    config = tmp_path / "config.toml"
    config.write_text(F.config_text([("orders", 13306, True)]))
    d = Daemon(default_paths({"DBTUNNELD_HOME": str(tmp_path / "home")}), config,
               Factories(F.engine_factory, F.tunnel_factory), stop_timeout=5).start()
    serving = threading.Thread(target=d.serve_forever, daemon=True)
    sup = d.supervisor
    try:
        serving.start()
        mine = detectors(sup)
        config.write_text(F.config_text([("orders", 13306, True), ("billing", 13307, True)]))
        d.reload()
        assert len(mine) == 1 and detectors(sup) == mine
        assert sup._wake._tick >= 5
    finally:
        d.request_stop()
        serving.join(5)
        d.shutdown()
    assert detectors(sup) == [] and not sup._wake.running


# ---- threads do not outlive their owner (issue 16)

class HangingTunnel(F.FakeTunnel):
    """A tunnel whose stop hangs until released (a wedged transport)."""

    release = threading.Event()

    def stop(self, timeout: float = 5.0) -> None:
        self.release.wait(30)
        super().stop(timeout)


def test_a_hung_tunnel_stop_is_bounded_and_its_thread_cannot_keep_the_process_alive(tmp_path, events):
    sup = Supervisor(cfg([("orders", 13306, True)]), default_paths({"DBTUNNELD_HOME": str(tmp_path)}),
                     engine_factory=F.engine_factory, tunnel_factory=lambda *a: HangingTunnel(*a),
                     on_event=lambda e, d: events.append((e, d)))
    sup.start(autoconnect=True)
    try:
        started = time.monotonic()
        sup.stop(timeout=0.5)
        assert time.monotonic() - started < 3.0 + 5.0     # the bound, plus the stop's slack
    finally:
        HangingTunnel.release.set()


HUNG_STOP_SCRIPT = """
import sys, threading, time
import fake_units as F
from dbtunneld.core.config import parse_config
from dbtunneld.core.paths import default_paths
from dbtunneld.engine.supervisor import Supervisor

class Hanging(F.FakeTunnel):
    def stop(self, timeout=5.0):
        threading.Event().wait(60)

sup = Supervisor(parse_config(F.config_text([("orders", 13306, True)]), "t.toml"),
                 default_paths({"DBTUNNELD_HOME": sys.argv[1]}), engine_factory=F.engine_factory,
                 tunnel_factory=lambda *a: Hanging(*a))
sup.start(autoconnect=True)
sup.stop(timeout=0.5)
print("stopped", flush=True)
"""


def test_a_worker_stuck_in_a_tunnel_stop_does_not_keep_the_process_from_exiting(tmp_path):
    """The engine loop's worker that runs a wedged ``stop`` (60 s) must not hold the interpreter's exit."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")])}
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", HUNG_STOP_SCRIPT, str(tmp_path / "home")], env=env,
                          capture_output=True, text=True, timeout=50)
    took = time.monotonic() - started
    print(f"process with a wedged tunnel stop exited after {took:.1f} s")
    assert "stopped" in proc.stdout, proc.stderr[-2000:]
    assert took < 20, f"the process waited for the wedged stop ({took:.1f} s)"
