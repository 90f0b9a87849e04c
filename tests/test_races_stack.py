"""Control-plane races of issue 16 on the real stack: ``disconnect --all`` while Vault hangs
answers within its bound (and status keeps answering), and ``stop`` during a connect ends the
daemon within its bound, frees the ports and leaves no thread stuck."""

from __future__ import annotations

import json
import re
import socket
import threading
import time

from dbtunneld.sandbox.daemonproc import DaemonOptions, DaemonUnderTest

REVOKE_TIMEOUT = 3.0
CLI_SLACK = 8.0           # starting the CLI's Python and the daemon's own bookkeeping, on a loaded machine


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def _status_latencies(d: DaemonUnderTest, busy: threading.Thread) -> list[float]:
    latencies = []
    while busy.is_alive() and len(latencies) < 200:
        started = time.monotonic()
        d.client.request("status", timeout=10)
        latencies.append(time.monotonic() - started)
        busy.join(0.02)
    return latencies


def test_disconnect_all_answers_within_its_bound_while_vault_hangs(stack, tmp_path):
    options = DaemonOptions(credentials={"revoke_timeout": REVOKE_TIMEOUT})
    with DaemonUnderTest(stack, tmp_path / "d", options) as d:
        d.start()
        d.sign_in()
        d.cli("connect", "orders", "--wait", "45")
        d.cli("connect", "billing", "--wait", "45")
        d.wait_up(["orders", "billing"])
        ports = [d.local_port("orders"), d.local_port("billing")]
        took: list[float] = []
        results: list = []

        def disconnect_all() -> None:
            started = time.monotonic()
            results.append(d.cli("disconnect", "--all", check=False, timeout=60))
            took.append(time.monotonic() - started)

        stack.openbao.freeze()
        try:
            worker = threading.Thread(target=disconnect_all)
            worker.start()
            latencies = _status_latencies(d, worker)
            worker.join(60)
            states = {t["name"]: t["state"] for t in d.status()["tunnels"]}
        finally:
            stack.openbao.thaw()
        print(f"disconnect --all took {took} with Vault frozen; {len(latencies)} status answers meanwhile, "
              f"slowest {max(latencies, default=-1) * 1000:.0f} ms")
        assert took and took[0] < REVOKE_TIMEOUT + CLI_SLACK, took
        assert took[0] >= REVOKE_TIMEOUT * 0.8, f"the revoke should have waited for the frozen Vault: {took}"
        assert results[0].returncode in (0, 1, 5), results[0].stdout + results[0].stderr
        assert set(states.values()) == {"stopped"}, states
        assert all(_port_free(p) for p in ports), "the tunnels' ports must be closed"
        assert latencies and max(latencies) < 0.5, latencies
        kept = json.loads(d.paths.leases_file.read_text())["leases"]
        assert {r["cluster"] for r in kept} == {"orders", "billing"}, "unrevoked leases stay for the next start"


def test_stop_during_a_connect_that_waits_for_a_hanging_vault(stack, tmp_path):
    options = DaemonOptions(credentials={"revoke_timeout": REVOKE_TIMEOUT})
    with DaemonUnderTest(stack, tmp_path / "d", options) as d:
        d.start()
        d.sign_in()
        pid = d.pid
        stack.openbao.freeze()
        try:
            d.client.request("connect", name="orders", wait=0, timeout=10)
            waiting = d.wait_for(lambda st: any(t["name"] == "orders" and t["state"] not in ("stopped", "up")
                                                for t in st["tunnels"]), 10, "orders connecting")
            port = next(t["local_port"] for t in waiting["tunnels"] if t["name"] == "orders")
            started = time.monotonic()
            stopped = d.stop(timeout=REVOKE_TIMEOUT + 20)
            took = time.monotonic() - started
        finally:
            stack.openbao.thaw()
        print(f"stop during connect (Vault frozen) took {took:.1f} s")
        assert stopped, f"the daemon did not exit within its bound: {d.stderr_tail()}"
        assert took < REVOKE_TIMEOUT + CLI_SLACK + 5, took
        assert not _pid_running(pid)
        assert _port_free(port)
        assert "Traceback" not in d.log_text(), d.stderr_tail(40)


def test_stop_right_after_a_connect(stack, tmp_path):
    with DaemonUnderTest(stack, tmp_path / "d", DaemonOptions()) as d:
        d.start()
        d.sign_in()
        d.client.request("connect", name="orders", wait=0, timeout=10)
        d.client.request("connect", name="billing", wait=0, timeout=10)
        started = time.monotonic()
        assert d.stop(timeout=30), d.stderr_tail()
        took = time.monotonic() - started
        print(f"stop right after connect took {took:.1f} s")
        assert "Traceback" not in d.log_text(), d.stderr_tail(40)
        assert not d.paths.socket_path.exists()


def test_a_reload_that_restarts_the_engine_while_vault_hangs(stack, tmp_path):
    """A credential setting changes (every unit restarts: the old engine revokes everything) while
    Vault is frozen: status keeps answering at once, the reload ends within the revoke bound, and
    the lease it could not revoke is revoked by the new engine once Vault answers again."""
    options = DaemonOptions(credentials={"revoke_timeout": REVOKE_TIMEOUT})
    with DaemonUnderTest(stack, tmp_path / "d", options) as d:
        d.start()
        d.sign_in()
        d.cli("connect", "orders", "--wait", "45")
        up = d.wait_up(["orders"])
        old_user = next(t["username"] for t in up["tunnels"] if t["name"] == "orders")
        d.write_config(re.sub(r"revoke_timeout = [0-9.]+", f"revoke_timeout = {REVOKE_TIMEOUT + 1}", d.config))
        took: list[float] = []

        def reload() -> None:
            started = time.monotonic()
            d.client.request("reload", timeout=60)
            took.append(time.monotonic() - started)

        stack.openbao.freeze()
        try:
            worker = threading.Thread(target=reload)
            worker.start()
            latencies = _status_latencies(d, worker)
            worker.join(60)
        finally:
            stack.openbao.thaw()
        ms = sorted(round(x * 1000) for x in latencies) or [-1]
        print(f"engine-restarting reload took {took} with Vault frozen; {len(latencies)} status answers "
              f"meanwhile, median {ms[len(ms) // 2]} ms, slowest {ms[-1]} ms")
        assert took and REVOKE_TIMEOUT * 0.8 <= took[0] < REVOKE_TIMEOUT + CLI_SLACK, took
        assert latencies and max(latencies) < 0.5, ms          # the goal is < 100 ms; the machine is shared
        d.wait_up(["orders"], timeout=60)                      # the new engine mints once Vault answers
        d.wait_for(lambda st: not json.loads(d.paths.leases_file.read_text())["leases"]
                   or all(r["username"] != old_user for r in json.loads(d.paths.leases_file.read_text())["leases"]),
                   60, "the old lease revoked by the new engine")
        assert old_user not in stack.dynamic_users("orders"), "the lease left by the reload must be revoked"


def _pid_running(pid: int) -> bool:
    from dbtunneld.core.paths import pid_alive

    return pid_alive(pid)
