"""A daemon that crashed (SIGKILL) comes back clean, on the real stack (issue 15, points 1-2).

- Killed while its parent does not reap it (a zombie keeps its pid): the next daemon must see
  that the zombie holds nothing and revoke its leases (DB users dropped, Vault leases gone).
- A pid now used by another program is not the lease's owner either (identity: start time and
  command line recorded with the pid).
- What the user connected comes back after a crash and after a stop/start (a reboot), not only
  ``autoconnect`` clusters; ``disconnect`` removes a cluster from that set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbtunneld.core.paths import ProcessIdentity, my_identity, parse_ps_line, pid_alive, process_identity
from dbtunneld.engine.lease_store import LeaseRecord, LeaseStore
from dbtunneld.engine.orphans import orphans
from dbtunneld.sandbox.daemonproc import DaemonUnderTest

pytest.importorskip("pymysql")

# A parent that starts the daemon and never waits for it: a SIGKILLed daemon stays a zombie.
NON_REAPING_PARENT = [sys.executable, "-c",
                      "import subprocess, sys, time; subprocess.Popen(sys.argv[1:]); time.sleep(3600)",
                      sys.executable, "-m", "dbtunneld.ui.cli"]


def _state(pid: int) -> str:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2:].split()[0]


def _lease_ids(d: DaemonUnderTest) -> set[str]:
    if not d.paths.leases_file.exists():
        return set()
    return {r["lease_id"] for r in json.loads(d.paths.leases_file.read_text())["leases"]}


def _vault_leases(stack, roles) -> set[str]:
    admin, found = stack.root_vault(), set()
    for role in roles:
        prefix = f"database/creds/{role}/"
        try:
            keys = admin.call("LIST", f"sys/leases/lookup/{prefix}")["data"]["keys"]
        except RuntimeError:
            keys = []
        found.update(prefix + k for k in keys)
    return found


def _eventually(check, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.fixture
def daemon(stack, tmp_path):
    made: list[DaemonUnderTest] = []

    def make(name: str = "d") -> DaemonUnderTest:
        d = DaemonUnderTest(stack, tmp_path / name)
        made.append(d)
        return d

    yield make
    for d in made:
        d.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="makes a zombie and reads /proc")
def test_zombie_daemon_is_not_alive_its_leases_are_revoked_at_restart(stack, daemon):
    d = daemon()
    d.start(launcher=NON_REAPING_PARENT)
    pid = d.adopt()
    assert pid != d.proc.pid, "the daemon runs under the non-reaping parent"
    d.sign_in()
    for name in ("orders", "billing"):
        d.cli("connect", name, "--wait", "45")
    d.wait_up(["orders", "billing"])
    users = {n: d.creds(n)["lease_user"] for n in ("orders", "billing")}
    leases = _lease_ids(d)
    assert len(leases) == 2 and set(users.values()) <= set(stack.dynamic_users())

    os.kill(pid, signal.SIGKILL)
    assert _eventually(lambda: _state(pid) == "Z", 10), "the killed daemon should stay a zombie"
    assert not pid_alive(pid)

    r = d.cli("connect", "orders", "--wait", "45", check=False)        # starts a fresh daemon
    assert r.returncode == 0, r.stdout + r.stderr
    assert _state(pid) == "Z", "still a zombie while the new daemon runs"
    gone = _eventually(lambda: not set(users.values()) & set(stack.dynamic_users()), 30)
    left = _vault_leases(stack, ("orders-ro", "billing-ro")) & leases
    print(f"after the restart: users of the zombie left {set(users.values()) & set(stack.dynamic_users())}, "
          f"its Vault leases left {left}")
    assert gone and not left
    new_user = d.creds("orders")["lease_user"]
    d.cli("disconnect", "--all")
    assert _eventually(lambda: not ({new_user} | set(users.values())) & set(stack.dynamic_users()), 20)


def test_a_pid_reused_by_another_program_owns_no_lease(tmp_path):
    other = subprocess.Popen(["sleep", "60"])
    try:
        me = my_identity()
        store = LeaseStore(tmp_path / "leases.json")
        # recorded by a dbtunneld process whose pid the OS has since given to `sleep`
        store.add(LeaseRecord("database/creds/r/reused", "orders", "v-1", "http://vault", other.pid, 1.0,
                              me.started.rsplit(":", 1)[0] + ":1", me.command))
        store.add(LeaseRecord("database/creds/r/live", "orders", "v-2", "http://vault", os.getpid(), 1.0,
                              me.started, me.command))
        found = [r.lease_id for r in orphans(LeaseStore(store.path).records(), me=-1)]
        assert found == ["database/creds/r/reused"]
    finally:
        other.kill()
        other.wait()


def test_old_lease_files_without_an_identity_still_load(tmp_path):
    path = tmp_path / "leases.json"
    path.write_text(json.dumps({"version": 1, "leases": [
        {"lease_id": "l1", "cluster": "c", "username": "u", "vault": "v", "pid": 999999999, "issued_at": 1.0}]}))
    records = LeaseStore(path).records()
    assert [r.lease_id for r in records] == ["l1"] and orphans(records) == records


def test_ps_identity_parses_the_macos_line_and_sees_zombies():
    line = "Ss   Fri Dec  4 15:41:38 2026     /usr/bin/python3 -m dbtunneld.ui.cli daemon --background\n"
    assert parse_ps_line(line) == ProcessIdentity("Fri Dec 4 15:41:38 2026",
                                                  "/usr/bin/python3 -m dbtunneld.ui.cli daemon --background")
    assert parse_ps_line("Z+   Fri Dec  4 15:41:38 2026     (python3)\n") is None
    assert parse_ps_line("") is None
    assert process_identity(os.getpid()) == my_identity() and my_identity().command


def test_connected_clusters_come_back_after_a_crash_and_a_restart(stack, daemon):
    d = daemon()
    d.start()
    d.sign_in()
    d.cli("connect", "orders", "--wait", "45")
    d.wait_up(["orders"])
    d.kill(signal.SIGKILL)

    d.start()                                        # plain `dbtunneld daemon`: no connect command
    st = d.wait_up(["orders"], timeout=60)
    states = {t["name"]: t["state"] for t in st["tunnels"]}
    assert states["billing"] == "stopped", states

    d.cli("connect", "billing", "--wait", "45")
    d.cli("disconnect", "orders")
    assert d.stop()                                  # a clean stop (a reboot, a quit)
    d.start()
    st = d.wait_up(["billing"], timeout=60)
    states = {t["name"]: t["state"] for t in st["tunnels"]}
    print(f"after stop + start: {states}")
    assert states["orders"] == "stopped", "disconnected clusters stay down"
