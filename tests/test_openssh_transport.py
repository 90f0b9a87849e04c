"""The ``ssh`` transport on OpenSSH (``[bastion] client = "openssh"``): a real ``ssh -M`` master
against the sandbox's sshd, client sockets handed to it over the mux protocol.

Byte-exact transfers (50 at once, three rounds), the ``mariadb`` CLI, a refused host key, a killed
master, stop closing forwarded connections, one master shared by tunnels through one bastion, no
secrets in the master's argv, and every ssh process gone by pid afterwards.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from dbtunneld.adapters import openssh_leftovers, openssh_mux
from dbtunneld.adapters.openssh_transport import MasterPool, MasterSettings, OpenSshTransport
from dbtunneld.adapters.transport_config import build_transport
from dbtunneld.core.config import TunnelSettings, parse_config
from dbtunneld.core.errors import ConfigError
from dbtunneld.core.model import TunnelState
from dbtunneld.engine.tunnel import Tunnel
from test_tunnel_stack import Watcher, echo_round_trip, eventually, query, recv_exact
from tunnel_servers import GreetingEchoServer, Sshd, keygen

pymysql = pytest.importorskip("pymysql")
pytestmark = pytest.mark.skipif(not shutil.which("ssh"), reason="no OpenSSH client")

S = TunnelState
SETTINGS = TunnelSettings(connect_wait=20, health_interval=30, health_timeout=2, keepalive_interval=2,
                          backoff_initial=0.2, backoff_max=2)


USER = [""]


@pytest.fixture(autouse=True)
def _stack_user(request):
    """The sandbox bastion's login (tests that use the stack)."""
    if "stack" in request.fixturenames:
        USER[0] = request.getfixturevalue("stack").ssh_user


@pytest.fixture(scope="module")
def bastion(stack, tmp_path_factory):
    echo = GreetingEchoServer()
    sshd = Sshd(tmp_path_factory.mktemp("openssh") / "bastion",
                permit_open=[stack.clusters["orders"].port, echo.port]).start()
    try:
        yield sshd, echo
    finally:
        sshd.stop()
        echo.close()


@pytest.fixture
def pool(tmp_path):
    p = MasterPool(tmp_path / "run")
    yield p
    for master in p.masters():
        master.stop()


@pytest.fixture
def tunnels(pool):
    made: list[Tunnel] = []

    def make(transport, remote, **kw) -> Tunnel:
        t = Tunnel(f"o{len(made)}", 0, remote[0], remote[1], transport, SETTINGS, **kw)
        made.append(t)
        t.start()
        return t

    yield make
    for t in made:
        t.stop()


def settings_for(sshd: Sshd, **kw: Any) -> MasterSettings:
    base = dict(host="127.0.0.1", port=sshd.port, user=USER[0], key_file=str(sshd.client_key),
                host_key=sshd.host_key_line, keepalive_interval=2, health_timeout=2, connect_timeout=5)
    return MasterSettings(**{**base, **kw})


def master_pids(pool: MasterPool) -> list[int]:
    return [m.pid for m in pool.masters() if m.pid]


def pid_alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


# ---- data ----------------------------------------------------------------------------------------

def test_50_concurrent_transfers_byte_exact_three_rounds(bastion, tunnels, pool):
    sshd, echo = bastion
    t = tunnels(OpenSshTransport(settings_for(sshd), pool), ("127.0.0.1", echo.port))
    eventually(lambda: t.state == S.UP, what="up")
    for rnd in range(3):
        results: list[Any] = [None] * 50

        def one(i):
            results[i] = echo_round_trip(t.local_port, 256 * 1024 + i, seed=50 * rnd + i)

        threads = [threading.Thread(target=one, args=(i,)) for i in range(50)]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
        failed = [i for i, r in enumerate(results) if r is None or r[0] != r[1]]
        assert not failed, f"round {rnd}: connections {failed} not byte-exact"
    assert t.status().connections_total >= 150
    eventually(lambda: t.status().connections_open == 0, what="every connection closed")


def test_adopt_hands_over_on_the_running_loop_without_a_thread(bastion, pool, monkeypatch):
    """``await adopt`` runs the mux hand-over on the caller's asyncio loop: 20 at once, no thread
    started and the blocking path never used; each adopted socket is forwarded byte-exact."""
    sshd, echo = bastion
    t = OpenSshTransport(settings_for(sshd), pool)
    t.connect()

    def no_blocking(*a, **kw):
        raise AssertionError("adopt_blocking used on the loop")
    monkeypatch.setattr(openssh_mux, "forward_client", no_blocking)

    def ours() -> set[int]:                               # the echo server's threads aside
        return {th.ident or 0 for th in threading.enumerate() if "(_echo)" not in th.name}

    async def hand_over() -> tuple[list, list, int]:
        pairs = [socket.socketpair() for _ in range(20)]
        before = ours()
        handles = await asyncio.gather(*(t.adopt(theirs, "127.0.0.1", echo.port, 10) for _, theirs in pairs))
        return pairs, handles, len(ours() - before)

    try:
        pairs, handles, new_threads = asyncio.run(hand_over())
        assert new_threads == 0
        for i, (ours, theirs) in enumerate(pairs):
            theirs.close()                                # the master holds its own copy
            ours.settimeout(10)
            header = recv_exact(ours, 4)
            recv_exact(ours, int.from_bytes(header[:3], "little"))
            ours.sendall(b"x%d" % i * 1000)
            assert recv_exact(ours, len(b"x%d" % i) * 1000) == b"x%d" % i * 1000
        for h in handles:
            h.close()
        for ours, _ in pairs:
            assert ours.recv(10) == b""                   # closing the handle ended the forward
            ours.close()
    finally:
        t.close()


def test_adopt_blocking_and_open_channel_still_work_off_the_loop(bastion, pool):
    sshd, echo = bastion
    t = OpenSshTransport(settings_for(sshd), pool)
    t.connect()
    try:
        chan = t.open_channel("127.0.0.1", echo.port, 10)   # adopt_blocking on a socketpair
        chan.settimeout(10)
        header = recv_exact(chan, 4)
        recv_exact(chan, int.from_bytes(header[:3], "little"))
        chan.sendall(b"ping")
        assert recv_exact(chan, 4) == b"ping"
        chan.close()
    finally:
        t.close()


def test_mariadb_cli_and_pymysql_through_the_master(stack, bastion, tunnels, pool, tmp_path):
    sshd, _ = bastion
    orders = stack.clusters["orders"]
    t = tunnels(OpenSshTransport(settings_for(sshd), pool), ("127.0.0.1", orders.port))
    assert query(t.local_port, orders) > 0
    opts = tmp_path / "my.cnf"
    opts.write_text(f"[client]\nuser={orders.admin_user}\npassword={orders.admin_password}\n")
    opts.chmod(0o600)
    cli = subprocess.run(["mariadb", f"--defaults-extra-file={opts}", "-h", "127.0.0.1", "-P", str(t.local_port),
                          "-N", "-e", f"SELECT COUNT(*) FROM `{orders.database}`.`{orders.table}`"],
                         capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert cli.returncode == 0, cli.stderr
    assert int(cli.stdout.strip()) > 0


# ---- faults --------------------------------------------------------------------------------------

def test_host_key_mismatch_is_refused_with_the_fix(stack, bastion, tunnels, pool, tmp_path):
    sshd, _ = bastion
    keygen(tmp_path / "impostor")
    pinned = " ".join((tmp_path / "impostor.pub").read_text().split()[:2])
    orders = stack.clusters["orders"]
    t = tunnels(OpenSshTransport(settings_for(sshd, host_key=pinned), pool), ("127.0.0.1", orders.port))
    eventually(lambda: t.state == S.FAILED, what="failed")
    st = t.status()
    assert "does not match" in st.last_error and "SHA256:" in st.last_error, st.last_error
    assert "bastion.host_key" in st.hint
    assert pool.masters() == []                 # nothing left running


def test_unknown_host_is_never_accepted(stack, bastion, tunnels, pool, tmp_path):
    sshd, _ = bastion
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    t = tunnels(OpenSshTransport(settings_for(sshd, host_key="", known_hosts=str(empty)), pool),
                ("127.0.0.1", stack.clusters["orders"].port))
    eventually(lambda: t.state == S.FAILED, what="failed")
    assert "is not known" in t.status().last_error
    assert empty.read_text() == ""              # never accept-new


@pytest.mark.fault
def test_killed_master_reconnects_and_the_port_keeps_accepting(stack, bastion, tunnels, pool):
    sshd, _ = bastion
    orders = stack.clusters["orders"]
    t = tunnels(OpenSshTransport(settings_for(sshd), pool), ("127.0.0.1", orders.port))
    assert query(t.local_port, orders) > 0
    with Watcher(t.local_port) as watcher:
        for _ in range(2):
            [old] = master_pids(pool)
            os.kill(old, signal.SIGKILL)
            eventually(lambda: master_pids(pool) not in ([], [old]) and t.state == S.UP, timeout=20,
                       what="a new master")
            assert query(t.local_port, orders) > 0
            assert not pid_alive(old)
        eventually(lambda: watcher.attempts > 5, what="the watcher's connects")
    assert watcher.attempts > 5 and watcher.refusals == []
    assert t.status().reconnects >= 2


@pytest.mark.fault
def test_frozen_bastion_ends_the_master_within_keepalive_and_the_tunnel_heals(stack, tunnels, pool, tmp_path):
    """ServerAliveInterval 2 s, CountMax 1: the master gives up about 4 s after the bastion froze."""
    orders = stack.clusters["orders"]
    own = Sshd(tmp_path / "frozen", permit_open=[orders.port]).start()
    try:
        t = tunnels(OpenSshTransport(settings_for(own), pool), ("127.0.0.1", orders.port))
        assert query(t.local_port, orders) > 0
        [pid] = master_pids(pool)
        own.freeze()
        frozen_at = time.monotonic()
        eventually(lambda: not pid_alive(pid), timeout=15, what="the master gave up")
        assert time.monotonic() - frozen_at < 2 + 2 + 3
        eventually(lambda: t.state != S.UP, timeout=5, what="loss noticed")
        own.thaw()
        assert query(t.local_port, orders) > 0
        assert t.state == S.UP and t.status().reconnects >= 1
    finally:
        own.stop()


def test_forward_the_bastion_refuses_reaches_the_client_as_a_mysql_error(stack, bastion, tunnels, pool):
    sshd, _ = bastion
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))
    port = closed.getsockname()[1]
    closed.close()                                    # outside PermitOpen and nothing listening
    t = tunnels(OpenSshTransport(settings_for(sshd), pool), ("127.0.0.1", port))
    with pytest.raises(pymysql.err.OperationalError) as info:
        pymysql.connect(host="127.0.0.1", port=t.local_port, user="x", password="y", connect_timeout=30)
    assert "could not open a channel" in str(info.value), info.value


def test_stop_closes_forwarded_connections_and_every_ssh_process(bastion, tunnels, pool):
    sshd, echo = bastion
    t = tunnels(OpenSshTransport(settings_for(sshd), pool), ("127.0.0.1", echo.port))
    eventually(lambda: t.state == S.UP, what="up")
    clients = [socket.create_connection(("127.0.0.1", t.local_port), timeout=10) for _ in range(3)]
    for c in clients:
        header = recv_exact(c, 4)
        recv_exact(c, int.from_bytes(header[:3], "little"))
    eventually(lambda: t.status().connections_open == 3, what="3 open")
    [pid] = master_pids(pool)
    folder = pool.masters()[0].dir
    t.stop()
    for c in clients:
        c.settimeout(5)
        assert c.recv(10) == b""                 # EOF: the forward was ended
        c.close()
    eventually(lambda: not pid_alive(pid), timeout=5, what="the master stopped")
    assert not folder.exists() and pool.masters() == []


def test_one_master_per_bastion_shared_and_reference_counted(stack, bastion, tunnels, pool):
    sshd, echo = bastion
    orders = stack.clusters["orders"]
    a = tunnels(OpenSshTransport(settings_for(sshd), pool), ("127.0.0.1", orders.port))
    b = tunnels(OpenSshTransport(settings_for(sshd), pool), ("127.0.0.1", echo.port))
    eventually(lambda: a.state == S.UP and b.state == S.UP, what="both up")
    [pid] = master_pids(pool)
    a.stop()
    assert pid_alive(pid) and master_pids(pool) == [pid]   # b still uses it
    assert echo_round_trip(b.local_port, 100_000, seed=1)[0] == echo_round_trip(b.local_port, 100_000, seed=1)[1]
    b.stop()
    eventually(lambda: not pid_alive(pid), timeout=5, what="the master stopped")


def test_no_secrets_in_the_master_argv(stack, bastion, tunnels, pool):
    sshd, _ = bastion
    orders = stack.clusters["orders"]
    t = tunnels(OpenSshTransport(settings_for(sshd), pool), ("127.0.0.1", orders.port))
    assert query(t.local_port, orders) > 0
    [pid] = master_pids(pool)
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    text = b" ".join(argv).decode()
    private = Path(sshd.client_key).read_text()
    for secret in (orders.admin_password, stack.vault_root_token if hasattr(stack, "vault_root_token") else "",
                   private.splitlines()[1]):
        assert not secret or secret not in text
    assert "StrictHostKeyChecking=yes" in text and "BatchMode=yes" in text and "accept-new" not in text
    assert "ServerAliveInterval=2" in text and "ServerAliveCountMax=1" in text


def test_mux_alive_check_answers_with_the_master_pid(bastion, pool):
    sshd, _ = bastion
    master = pool.acquire(settings_for(sshd))
    try:
        assert openssh_mux.alive_check(master.control_path, 5) == master.pid
        assert master.ping(5)
    finally:
        pool.release(master)
    assert not master.ping(1) and not pid_alive(master.pid)


class _RegisterThenPause:
    """The watcher's selector, with a pause after each register until the forward has ended
    (at most 0.5 s): lets the select thread end a forward the master already ended before
    ``watch`` returns, the interleaving that once left a stale registration."""

    def __init__(self, real: Any) -> None:
        self.real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)

    def register(self, fileobj: Any, events: int, data: Any = None) -> Any:
        key = self.real.register(fileobj, events, data)
        if data is not None:
            data.done.wait(0.5)
        return key


def test_end_watcher_leaves_no_stale_registration_when_the_master_ends_a_forward_at_once():
    watcher = openssh_mux.EndWatcher("test-ends")
    real = watcher._selector
    try:
        watcher._selector = _RegisterThenPause(real)
        for _ in range(3):
            ours, master_side = socket.socketpair()
            master_side.close()                            # the master ended it: EOF at once
            fwd = openssh_mux.MuxForward(openssh_mux.MuxConnection(ours), 1, "ended-at-once")
            watcher.watch(fwd)
            assert fwd.done.wait(5)
            eventually(lambda: len(real.get_map()) == 1, timeout=5, what="only the wake socket left")
        watcher._selector = real
        ours, master_side = socket.socketpair()            # likely the same fd number again
        fwd = openssh_mux.MuxForward(openssh_mux.MuxConnection(ours), 2, "next")
        watcher.watch(fwd)                                 # once: KeyError, and the forward leaked
        assert not fwd.ended and real.get_key(ours).data is fwd
        master_side.close()
        assert fwd.done.wait(5)
    finally:
        watcher.close()


def test_forget_never_drops_another_forwards_registration():
    watcher = openssh_mux.EndWatcher("test-forget")
    try:
        a, a_peer = socket.socketpair()
        first = openssh_mux.MuxForward(openssh_mux.MuxConnection(a), 1, "first")
        watcher.watch(first)
        second = openssh_mux.MuxForward(openssh_mux.MuxConnection(a), 2, "same fd, not registered")
        watcher.forget(second)
        assert watcher._selector.get_key(a).data is first
        first.close()
        assert len(watcher._selector.get_map()) == 1
        a_peer.close()
    finally:
        watcher.close()


@pytest.mark.fault
def test_master_killed_while_clients_arrive_leaks_no_forward(bastion, tunnels, pool, caplog):
    """Clients keep connecting while the master is killed twice and the tunnel reconnects:
    every connection ends, no callback fails, no KeyError."""
    sshd, echo = bastion
    t = tunnels(OpenSshTransport(settings_for(sshd), pool), ("127.0.0.1", echo.port))
    eventually(lambda: t.state == S.UP, what="up")
    stop = threading.Event()
    held: list[socket.socket] = []

    def arrive() -> None:
        while not stop.is_set():
            try:
                held.append(socket.create_connection(("127.0.0.1", t.local_port), timeout=5))
            except OSError:
                pass
    arrivals = [threading.Thread(target=arrive) for _ in range(4)]
    for th in arrivals:
        th.start()
    try:
        for _ in range(2):
            eventually(lambda: t.status().connections_open >= 5, timeout=20, what="clients forwarded")
            [old] = master_pids(pool)
            os.kill(old, signal.SIGKILL)
            eventually(lambda: master_pids(pool) not in ([], [old]) and t.state == S.UP, timeout=20,
                       what="a new master")
    finally:
        stop.set()
        for th in arrivals:
            th.join(10)
        for c in held:
            c.close()
    eventually(lambda: t.status().connections_open == 0, timeout=20, what="every connection ended")
    assert "KeyError" not in caplog.text and "end callback failed" not in caplog.text


def test_paths_with_spaces_and_percent_reach_ssh_as_one_path(bastion, tmp_path):
    """A key and known_hosts in a folder named "my keys %h": ssh must not split or expand them."""
    sshd, _ = bastion
    odd = tmp_path / "my keys %h"
    odd.mkdir()
    key = odd / "id"
    shutil.copy(sshd.client_key, key)
    key.chmod(0o600)
    known = odd / "known hosts"
    known.write_text(sshd.known_hosts_line())
    pool = MasterPool(odd / "run")
    master = pool.acquire(settings_for(sshd, key_file=str(key), host_key="", known_hosts=str(known)))
    try:
        assert master.ping(5)
    finally:
        pool.release(master)
    assert not pid_alive(master.pid)


# ---- config --------------------------------------------------------------------------------------

BASE = """
[vault]
address = "http://127.0.0.1:8200"
role = "r"
[bastion]
transport = "ssh"
host = "bastion.example.com"
{extra}
[[clusters]]
name = "c"
endpoint = "db.example.com"
db_role = "r"
"""


def test_config_selects_the_client(stack, bastion):
    cfg = parse_config(BASE.format(extra='client = "openssh"'))
    assert cfg.bastion.client == "openssh"
    assert isinstance(build_transport(cfg, cfg.clusters[0]), OpenSshTransport)
    pinned = parse_config(BASE.format(extra='client = "paramiko"'))
    assert pinned.bastion.client == "paramiko"
    assert not isinstance(build_transport(pinned, pinned.clusters[0]), OpenSshTransport)


@pytest.mark.parametrize("extra, says", [
    ('client = "putty"', 'unknown SSH client'),
    ('client = "openssh"\nec2_instance_connect = true', 'client = "paramiko"'),
])
def test_config_errors_name_the_key_and_the_fix(extra, says):
    with pytest.raises(ConfigError) as info:
        parse_config(BASE.format(extra=extra))
    assert "bastion.client" in str(info.value) and says in str(info.value)


def test_config_without_ssh_on_path_says_how_to_fix(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(ConfigError) as info:
        parse_config(BASE.format(extra='client = "openssh"'))
    text = str(info.value)
    assert "bastion.client" in text and "install the OpenSSH client" in text


# ---- masters a killed daemon left ----------------------------------------------------------------

def _fake_master(tmp_path: Path) -> tuple[subprocess.Popen, Path]:
    """A process whose command line reads like a master's (``-o ControlMaster=yes``) and its folder."""
    folder = tmp_path / "run" / "ssh-fake"
    folder.mkdir(parents=True)
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", "-o", "ControlMaster=yes"])
    eventually(lambda: "ControlMaster=yes" in Path(f"/proc/{proc.pid}/cmdline").read_bytes().decode(errors="replace"),
               what="the fake master's command line")
    return proc, folder


def _dead_owner() -> tuple[int, Any]:
    """The pid and identity of a process that has ended (a daemon killed earlier)."""
    from dbtunneld.core.paths import process_identity
    owner = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    identity = process_identity(owner.pid)
    owner.stdin.close()
    owner.wait(10)
    return owner.pid, identity


def _rewrite(path: Path, **changes: Any) -> None:
    import json
    doc = json.loads(path.read_text())
    doc.update(changes)
    path.write_text(json.dumps(doc))


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_leftover_master_of_a_dead_daemon_is_stopped_by_pid(tmp_path):
    proc, folder = _fake_master(tmp_path)
    try:
        record = openssh_leftovers.record_master(tmp_path / "run", proc.pid, folder)
        owner_pid, owner = _dead_owner()
        _rewrite(record, owner_pid=owner_pid, owner_started=owner.started, owner_command=owner.command)
        assert openssh_leftovers.end_leftover_masters(tmp_path / "run") == [proc.pid]
        assert proc.wait(5) == -signal.SIGTERM
        assert not record.exists() and not folder.exists()
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc")
def test_masters_of_a_live_daemon_and_reused_pids_are_left_alone(tmp_path):
    proc, folder = _fake_master(tmp_path)
    try:
        record = openssh_leftovers.record_master(tmp_path / "run", proc.pid, folder)
        # recorded by this (live) process: another daemon's master, even when asked from another pid
        assert openssh_leftovers.end_leftover_masters(tmp_path / "run", me=1) == []
        assert proc.poll() is None and record.exists()
        # the owner is dead but the pid is now another process (another start time): not ours
        owner_pid, owner = _dead_owner()
        _rewrite(record, owner_pid=owner_pid, owner_started=owner.started, owner_command=owner.command,
                 started=owner.started.rsplit(":", 1)[0] + ":1")
        assert openssh_leftovers.end_leftover_masters(tmp_path / "run") == []
        assert proc.poll() is None
        assert not record.exists()                     # a record that names nothing of ours is dropped
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.fault
def test_daemon_killed_with_an_openssh_tunnel_up_ends_the_old_master_at_restart(stack):
    import json
    import tempfile
    from dbtunneld.sandbox.daemonproc import DaemonUnderTest
    from dbtunneld.core.paths import process_identity

    root = Path(tempfile.mkdtemp(prefix="dbt-ossh-", dir="/tmp"))    # short: the control path fits
    old: dict[str, Any] = {}
    old_identity = None
    try:
        with DaemonUnderTest(stack, root) as d:
            d.write_config(d.config.replace('transport = "ssh"\n', 'transport = "ssh"\nclient = "openssh"\n', 1))
            d.start()
            d.sign_in()
            d.cli("connect", "orders", "--wait", "45")
            d.wait_up(["orders"])
            assert _daemon_query(d, "orders")
            records = openssh_leftovers.records_dir(d.paths.runtime_dir)
            [found] = [json.loads(p.read_text()) for p in records.glob("*.json")]
            old.update(found)
            assert old["owner_pid"] == d.pid and pid_alive(old["pid"])
            old_identity = process_identity(old["pid"])
            d.kill()                                    # SIGKILL: the master outlives it
            assert process_identity(old["pid"]) == old_identity
            d.start()
            assert process_identity(old["pid"]) != old_identity, "the old master still runs"
            d.cli("connect", "orders", "--wait", "45")
            d.wait_up(["orders"])
            assert _daemon_query(d, "orders")
            [new] = [json.loads(p.read_text()) for p in records.glob("*.json")]
            assert new["pid"] != old["pid"] and new["owner_pid"] == d.pid and pid_alive(new["pid"])
            d.stop()
            eventually(lambda: not pid_alive(new["pid"]), timeout=10, what="the new master stopped with the daemon")
            assert list(records.glob("*.json")) == []
    finally:
        if old and process_identity(old["pid"]) == old_identity:
            os.kill(old["pid"], signal.SIGKILL)         # this test's own leftover, by pid
        shutil.rmtree(root, ignore_errors=True)


def _daemon_query(d: Any, name: str) -> bool:
    c = d.creds(name)
    conn = pymysql.connect(host="127.0.0.1", port=c["port"], user=c["username"], password=c["password"],
                           database=c["database"] or None, connect_timeout=20, read_timeout=20)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone() == (1,)
    finally:
        conn.close()
