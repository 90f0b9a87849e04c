"""Benchmarks of the real daemon process on the sandbox stack, each beside a reference measured in
the same run: click-to-first-query, reconnect and detection after bastion faults, idle CPU and
memory with 1, 10 and 50 tunnels, Vault requests per hour, and a sysbench workload.

Every daemon is a ``dbtunneld daemon`` process with a private home (``sandbox.daemonproc``), driven
through the CLI; OpenSSH ``ssh -L`` processes to the same bastion are the references. Each stage
returns ``report.Figure`` rows (and chart series); processes are stopped by pid by ``DaemonLab``.
"""

from __future__ import annotations

import contextlib
import socket
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from bench.report import Figure
from dbtunneld.sandbox.daemonproc import DaemonOptions, DaemonUnderTest, sample
from dbtunneld.sandbox.procs import free_port, pid_alive, wait_until

CLICK = "Click to first query (SSO already signed in)"
FAULTS = "Bastion faults (default settings: keepalive 5 s + 5 s timeout)"
IDLE = "Idle daemon (real process, /proc/PID/stat and status)"
VAULT = "Vault requests per hour per developer"
SYSBENCH = "sysbench oltp_read_only (4 threads)"
TIME_SCALE = 120.0           # the Vault stage runs the sandbox's TTLs 120 times faster


# ---------------------------------------------------------------------------- the lab

@dataclass
class DaemonLab:
    """The sandbox stack plus every daemon and OpenSSH process a stage starts (stopped by pid)."""

    stack: Any
    root: Path
    quick: bool = False
    daemons: list[DaemonUnderTest] = field(default_factory=list)
    procs: list[subprocess.Popen] = field(default_factory=list)

    def daemon(self, name: str, **options: Any) -> DaemonUnderTest:
        d = DaemonUnderTest(self.stack, self.root / name, DaemonOptions(**options))
        self.daemons.append(d)
        return d

    def openssh(self, remote_port: int, *options: str) -> tuple[subprocess.Popen, int]:
        """``ssh -N -L`` to the stack's bastion (its defaults unless ``options``)."""
        s, port = self.stack, free_port()
        argv = ["ssh", "-F", "/dev/null", "-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
                "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={s.known_hosts}",
                "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                "-i", s.ssh_key_file, "-p", str(s.ssh_port), *options,
                "-L", f"127.0.0.1:{port}:127.0.0.1:{remote_port}", f"{s.ssh_user}@127.0.0.1"]
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        self.procs.append(proc)
        return proc, port

    def close(self) -> None:
        for d in self.daemons:
            with contextlib.suppress(Exception):
                d.close()
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(10)


def mysql_greeting(port: int, timeout: float = 5.0) -> bool:
    """True when 127.0.0.1:port answers with a MySQL greeting (protocol 10)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            header = s.recv(5)
            return len(header) == 5 and header[4] == 0x0A
    except OSError:
        return False


def query(port: int, user: str, password: str, sql: str = "SELECT 1", timeout: float = 30.0) -> Any:
    import pymysql

    conn = pymysql.connect(host="127.0.0.1", port=port, user=user, password=password, connect_timeout=timeout,
                           read_timeout=timeout)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            return cur.fetchone()
    finally:
        conn.close()


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


# ---------------------------------------------------------------------------- click to first query

def click_to_first_query(lab: DaemonLab, reps: int) -> list[Figure]:
    """`dbtunneld connect orders` to a successful query with its leased user, daemon running
    (warm: the tray's case) and not running (cold: `connect` starts it); OpenSSH ``ssh -L`` plus a
    query with a known password is the reference."""
    d = lab.daemon("click")
    d.start()
    d.sign_in()
    warm = []
    for _ in range(reps):
        warm.append(_connect_and_query(d))
        d.cli("disconnect", "orders")
    d.stop()
    cold = _connect_and_query(d)
    d.cli("disconnect", "orders")
    ref = _median([_openssh_first_query(lab) for _ in range(reps)])
    return [Figure(CLICK, "connect -> first query", "dbtunneld (daemon running)", _median(warm), "s",
                   "OpenSSH ssh -L + known password", ref, higher_is_better=False,
                   note="`dbtunneld connect` (a CLI process), then the password over the control socket "
                        "(as the tray copies it) and a PyMySQL login + SELECT 1 as the leased user; "
                        "includes minting the DB user in Vault"),
            Figure(CLICK, "connect -> first query", "dbtunneld (daemon not running)", cold, "s",
                   "OpenSSH ssh -L + known password", ref, higher_is_better=False,
                   note="`dbtunneld connect` starts the daemon, which logs in to Vault with the cached SSO")]


def _connect_and_query(d: DaemonUnderTest) -> float:
    t0 = time.perf_counter()
    d.cli("connect", "orders", "--wait", "60")
    c = d.creds("orders")
    query(c["port"], c["username"], c["password"])
    return time.perf_counter() - t0


def _openssh_first_query(lab: DaemonLab) -> float:
    c = lab.stack.clusters["orders"]
    t0 = time.perf_counter()
    proc, port = lab.openssh(c.port)
    try:
        wait_until(lambda: mysql_greeting(port, 2), 30)
        query(port, c.admin_user, c.admin_password)
        return time.perf_counter() - t0
    finally:
        proc.kill()
        proc.wait(10)


# ---------------------------------------------------------------------------- bastion faults

def bastion_faults(lab: DaemonLab, reps: int, transports: tuple[str, ...] = ("ssh", "ssm-ssh")) -> list[Figure]:
    """Reconnect after the bastion returns and detection of a frozen one, through the daemon (ssh
    and ssm-ssh transports); OpenSSH with ServerAlive 5 s x 2 is the detection reference."""
    ref_detect = _openssh_detection(lab)
    figures = []
    for transport in transports:
        if transport != "ssh" and lab.stack.ssm is None:
            continue
        reconnect, detect = _daemon_faults(lab, transport, reps)
        who = f"dbtunneld {transport} (daemon)"
        figures += [
            Figure(FAULTS, "reconnect after the bastion returns", who, _median(reconnect), "s",
                   "OpenSSH ssh -L", None, higher_is_better=False, target="< 3 s",
                   note=f"median of {len(reconnect)} kills (max {max(reconnect, default=0):.2f} s): from sshd "
                        "accepting again to a query through the same local port; OpenSSH exits instead "
                        "(no reconnect without a wrapper)" if transport == "ssh" else
                        f"median of {len(reconnect)} kills (max {max(reconnect, default=0):.2f} s)"),
            Figure(FAULTS, "frozen bastion detected", who, _median(detect), "s",
                   "OpenSSH ssh -L (ServerAlive 5 s x 2)", ref_detect, higher_is_better=False, target="< 15 s"),
        ]
    return figures


def _daemon_faults(lab: DaemonLab, transport: str, reps: int) -> tuple[list[float], list[float]]:
    sshd = lab.stack.sshd
    d = lab.daemon(f"faults-{transport}", transport=transport, clusters=("orders",))
    d.start()
    d.sign_in()
    d.cli("connect", "orders", "--wait", "60")
    c = d.creds("orders")
    reconnect, detect = [], []
    try:
        for _ in range(reps):
            sshd.kill()
            d.wait_for(lambda st: _state(st) != "up", 30, "the dead bastion to be noticed")
            time.sleep(1.0)                              # the outage
            sshd.start()
            t0 = time.perf_counter()
            query(c["port"], c["username"], c["password"], timeout=60)
            reconnect.append(time.perf_counter() - t0)
            d.wait_up(["orders"], 60)
        sshd.freeze()
        t0 = time.monotonic()
        try:
            d.wait_for(lambda st: _state(st) != "up", 60, "the frozen bastion to be noticed")
            detect.append(time.monotonic() - t0)
        finally:
            sshd.thaw()
        d.wait_up(["orders"], 60)
    finally:
        d.stop()
    return reconnect, detect


def _state(status: dict[str, Any]) -> str:
    return next(t["state"] for t in status["tunnels"] if t["name"] == "orders")


def _openssh_detection(lab: DaemonLab) -> float | None:
    """Seconds until ``ssh -L`` with ServerAliveInterval 5, CountMax 2 exits on a frozen bastion."""
    c = lab.stack.clusters["orders"]
    proc, port = lab.openssh(c.port, "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=2")
    try:
        if not wait_until(lambda: mysql_greeting(port, 2), 30):
            return None
        lab.stack.sshd.freeze()
        t0 = time.monotonic()
        try:
            proc.wait(60)
            return time.monotonic() - t0
        except subprocess.TimeoutExpired:
            return None
        finally:
            lab.stack.sshd.thaw()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


# ---------------------------------------------------------------------------- idle cost

def idle_costs(lab: DaemonLab, counts: tuple[int, ...], seconds: float) -> tuple[list[Figure], dict[str, Any]]:
    """CPU % of one core, RSS, threads and wakeups/s of a daemon keeping N idle tunnels up, beside
    N OpenSSH ``ssh -L`` processes measured over the same window."""
    figures, series = [], {"tunnels": [0, *counts], "dbtunneld RSS MiB": [], "OpenSSH RSS MiB": [0.0]}
    for n in counts:
        d = lab.daemon(f"idle-{n}", clusters=("orders",), copies=n - 1)
        d.start()
        d.sign_in()
        if n == counts[0]:
            series["dbtunneld RSS MiB"].append(sample(d.pid).rss_kib / 1024)   # signed in, no tunnel
        d.cli("connect", "--all", "--wait", "120", timeout=300)
        d.wait_up(d.cluster_names(), 120)
        ours, ref = _idle_window(lab, d.pid, n, seconds)
        d.stop()
        series["dbtunneld RSS MiB"].append(ours["rss"])
        series["OpenSSH RSS MiB"].append(ref["rss"])
        figures += _idle_figures(n, ours, ref, seconds)
    return figures, series


def _idle_window(lab: DaemonLab, pid: int, n: int, seconds: float) -> tuple[dict[str, float], dict[str, float]]:
    port = lab.stack.clusters["orders"].port
    started = [lab.openssh(port) for _ in range(n)]
    ssh = [proc for proc, _ in started]
    try:
        for _, local in started:                          # every forward answers before the window
            wait_until(lambda: mysql_greeting(local, 2), 60)
        time.sleep(3.0)                                   # let start-up work settle
        before = _samples([pid]), _samples([p.pid for p in ssh])
        time.sleep(seconds)
        after = _samples([pid]), _samples([p.pid for p in ssh])
    finally:
        for p in ssh:
            p.kill()
            p.wait(10)
    return _rates(before[0], after[0], seconds), _rates(before[1], after[1], seconds)


def _samples(pids: list[int]) -> list:
    return [sample(p) for p in pids if pid_alive(p)]


def _rates(before: list, after: list, seconds: float) -> dict[str, float]:
    return {"cpu": 100.0 * (sum(s.cpu_seconds for s in after) - sum(s.cpu_seconds for s in before)) / seconds,
            "rss": sum(s.rss_kib for s in after) / 1024,
            "threads": sum(s.threads for s in after),
            "wakeups": (sum(s.context_switches for s in after) - sum(s.context_switches for s in before)) / seconds}


def _idle_figures(n: int, ours: dict[str, float], ref: dict[str, float], seconds: float) -> list[Figure]:
    ref_name = f"OpenSSH: {n} x ssh -L" if n > 1 else "OpenSSH: 1 ssh -L"
    who = f"dbtunneld, {n} tunnel{'s' if n > 1 else ''}"
    return [
        Figure(IDLE, "CPU % of one core", who, ours["cpu"], "%", ref_name, ref["cpu"], higher_is_better=False,
               target="well under 1 %" if n == 10 else "", note=f"over {seconds:g} s" if n == 1 else ""),
        Figure(IDLE, "resident memory", who, ours["rss"], "MiB", ref_name, ref["rss"], higher_is_better=False),
        Figure(IDLE, "wakeups (context switches)/s", who, ours["wakeups"], "/s", ref_name, ref["wakeups"],
               higher_is_better=False, note=f"{ours['threads']:.0f} threads" if n else ""),
    ]


# ---------------------------------------------------------------------------- Vault requests

class VaultRate:
    """Vault requests per hour of one daemon with two clusters connected, at the sandbox's TTLs
    (token 1 h / max 4 h, lease 1 h / max 4 h) and dbtunneld's default settings. Runs in a thread
    on its own stack whose TTLs (and ``credentials.mint_ahead``) are ``TIME_SCALE`` times shorter,
    counts with the daemon's own counter (``vault.REQUESTS`` through ``bench.daemon_counters``) and
    a tap in front of Vault, and scales back: per hour = count x 3600 / (seconds x TIME_SCALE)."""

    def __init__(self, root: Path, seconds: float) -> None:
        self.root, self.seconds = root, seconds
        self.result: dict[str, Any] = {}
        self.error = ""
        self._thread = threading.Thread(target=self._run, name="vault-rate", daemon=True)

    def start(self) -> "VaultRate":
        self._thread.start()
        return self

    def figures(self, timeout: float) -> list[Figure]:
        self._thread.join(timeout)
        if self._thread.is_alive() or self.error:
            raise RuntimeError(self.error or "the Vault stage did not finish in time")
        r = self.result
        ref = expected_requests_per_hour(3600, 4 * 3600, 3600, 4 * 3600, clusters=2)
        note = (f"measured over {self.seconds:g} s with TTLs / {TIME_SCALE:g} (= {r['simulated_hours']:.1f} h); "
                f"{r['count']} answers counted by the daemon, {r['tap']} requests seen by a tap in front of Vault")
        return [Figure(VAULT, "requests per hour (2 clusters connected)", "dbtunneld (daemon's own counter)",
                       r["per_hour"], "req/h", "renew at ~2/3 TTL (LifetimeWatcher), computed", ref,
                       higher_is_better=False, note=note)]

    def _run(self) -> None:
        try:
            self.result = self._measure()
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"

    def _measure(self) -> dict[str, Any]:
        from dbtunneld.sandbox.stack import start_stack
        from dbtunneld.sandbox.vaulttap import VaultTap

        k = TIME_SCALE
        with start_stack(token_ttl=int(3600 / k), token_max_ttl=int(4 * 3600 / k), lease_ttl=int(3600 / k),
                         lease_max_ttl=int(4 * 3600 / k)) as stack:
            tap = VaultTap(stack.vault_addr)
            lab = DaemonLab(stack, self.root)
            try:
                return self._count(lab, tap, k)
            finally:
                lab.close()
                tap.close()

    def _count(self, lab: DaemonLab, tap: Any, k: float) -> dict[str, Any]:
        counters = self.root / "counters.json"
        d = lab.daemon("vault-rate", vault_address=tap.address, credentials={"mint_ahead": 600.0 / k})
        d.start(launcher=[sys.executable, "-m", "bench.daemon_counters", str(counters)])
        d.sign_in()
        d.cli("connect", "--all", "--wait", "60")
        d.wait_up(d.cluster_names(), 60)
        time.sleep(2.0)
        c0, t0 = _counter(counters), tap.requests
        time.sleep(self.seconds)
        c1, t1 = _counter(counters), tap.requests
        d.stop()
        hours = self.seconds * k / 3600
        return {"count": c1 - c0, "tap": t1 - t0, "simulated_hours": hours, "per_hour": (c1 - c0) / hours}


def _counter(path: Path) -> int:
    import json

    wait_until(path.exists, 10)
    return int(json.loads(path.read_text())["vault_requests"])


def expected_requests_per_hour(token_ttl: float, token_max: float, lease_ttl: float, lease_max: float,
                               clusters: int) -> float:
    """The LifetimeWatcher schedule: renew after ~2/3 of the TTL plus a third of a 15 % grace; one
    fresh login / lease (plus the renewals it restarts) per max TTL."""
    cycle = 2.0 / 3.0 + 0.15 / 3.0
    token = 3600 / (token_ttl * cycle) + 3600 / token_max
    lease = 3600 / (lease_ttl * cycle) + 3600 / lease_max
    return token + clusters * lease


# ---------------------------------------------------------------------------- sysbench

def sysbench(lab: DaemonLab, seconds: float, tables: int, table_size: int) -> tuple[list[Figure], dict[str, Any]]:
    """oltp_read_only through direct TCP, OpenSSH ``ssh -L`` and the daemon's tunnel, as the
    daemon's leased (read-only) user; tables prepared by the cluster's admin on the direct port."""
    from bench import workload

    if not workload.available():
        raise RuntimeError("sysbench is not installed (Debian package sysbench)")
    c = lab.stack.clusters["orders"]
    admin = workload.Target("127.0.0.1", c.port, c.admin_user, c.admin_password, c.database)
    workload.prepare(admin, tables, table_size)
    try:
        return _sysbench_paths(lab, seconds, tables, table_size)
    finally:
        workload.cleanup(admin, tables)


def _sysbench_paths(lab: DaemonLab, seconds: float, tables: int, table_size: int):
    from bench import workload

    c = lab.stack.clusters["orders"]
    d = lab.daemon("sysbench", clusters=("orders",))
    d.start()
    d.sign_in()
    d.cli("connect", "orders", "--wait", "60")
    creds = d.creds("orders")
    proc, ssh_port = lab.openssh(c.port)
    wait_until(lambda: mysql_greeting(ssh_port, 2), 30)
    # the daemon's port takes its login (login = "local" by default: a local user only it knows);
    # the references take the cluster's own user
    admin = (c.admin_user, c.admin_password)
    ports = {"direct TCP": (c.port, admin), "OpenSSH ssh -L": (ssh_port, admin),
             "dbtunneld (daemon, ssh)": (creds["port"], (creds["username"], creds["password"]))}
    results = {}
    try:
        for name, (port, (user, password)) in ports.items():
            t = workload.Target("127.0.0.1", port, user, password, c.database)
            results[name] = workload.run(t, seconds, threads=4, tables=tables, table_size=table_size)
    finally:
        proc.kill()
        proc.wait(10)
        d.stop()
    return _sysbench_figures(results, seconds), {name: r.tps for name, r in results.items()}


def _sysbench_figures(results: dict[str, Any], seconds: float) -> list[Figure]:
    ref, ours, direct = results["OpenSSH ssh -L"], results["dbtunneld (daemon, ssh)"], results["direct TCP"]
    note = f"{seconds:g} s each, as the leased read-only user; direct TCP: {direct.tps:.0f} tps, p95 {direct.latency_p95_ms:.1f} ms"
    return [
        Figure(SYSBENCH, "transactions/s", "dbtunneld (daemon, ssh)", ours.tps, "tps", "OpenSSH ssh -L", ref.tps,
               note=note),
        Figure(SYSBENCH, "queries/s", "dbtunneld (daemon, ssh)", ours.qps, "qps", "OpenSSH ssh -L", ref.qps),
        Figure(SYSBENCH, "latency p95", "dbtunneld (daemon, ssh)", ours.latency_p95_ms, "ms", "OpenSSH ssh -L",
               ref.latency_p95_ms, higher_is_better=False),
        Figure(SYSBENCH, "transactions/s", "direct TCP (ceiling)", direct.tps, "tps"),
    ]


@contextlib.contextmanager
def daemon_lab(root: Path, quick: bool) -> Iterator[DaemonLab]:
    """The sandbox stack with the SSM stand-in, and a lab that stops what it starts."""
    from dbtunneld.sandbox.stack import start_stack

    with start_stack(ssm=True) as stack:
        lab = DaemonLab(stack, root, quick)
        try:
            yield lab
        finally:
            lab.close()
