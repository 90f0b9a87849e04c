"""The data path under many clients (issue 17): dbtunneld's ``ssh`` tunnel against OpenSSH ``ssh -L``
through the same sandbox bastion to the same MariaDB, measured in turns within one run.

Per load round, for each path in turn: ``mariadb-slap`` (50 clients, ``SELECT 1``) queries/s and
sysbench ``oltp_read_only`` with 4 and 16 threads (tps, p95); the forwarder's CPU per query
(utime + stime of the dbtunneld process vs of the ``ssh`` client, ``/proc/PID/stat``). RSS and
thread count of each forwarder before the first and after the last round; then idle wake-ups
per second of 10 tunnels in one dbtunneld process vs 10 ``ssh -L`` (voluntary + involuntary
context switches of every thread, ``/proc/PID/task/*/status``). dbtunneld runs twice: with
``bastion.client = "openssh"`` (what the default "auto" picks where ssh is on PATH; its CPU, RSS and
wake-ups count the daemon plus its ``ssh -M`` master; bench.json's top-level ratios) and with
``client = "paramiko"`` (Windows, EC2 Instance Connect; the ``paramiko_client_`` keys). These
tunnels pass bytes through (``login = "lease"``). The default login (``login = "local"``) runs as a
third dbtunneld path (client openssh, clients logging in as a local user, the daemon logging in
upstream and then relaying to the master: ``local_login_`` keys), beside two references that show
what that relay hop costs by itself: ``ssh -L`` behind a minimal Python relay (``bench/hop_relay.py``)
and behind socat (C; where installed).

    python -m bench.data_path [--quick] [--ref DIR]

``--ref DIR`` adds a third path: the dbtunneld found in DIR (another checkout, e.g. the commit
before a change), for old-vs-new figures on a busy machine. The figures are medians over rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import statistics
import subprocess
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

from bench.report import Figure

SECTION = "Data path under load (sandbox bastion, MariaDB)"
REFERENCE = "OpenSSH ssh -L"
OURS = "dbtunneld ssh, client paramiko"          # bastion.client = "paramiko" (where "auto" cannot use OpenSSH)
OURS_OPENSSH = "dbtunneld ssh, client openssh"    # the default ("auto" with ssh on PATH): an ssh -M master moves the bytes
OURS_LOCAL = "dbtunneld ssh, client openssh, login local"   # the default login: the daemon relays to the master
HOP_PYTHON = "ssh -L behind a Python relay hop"   # bench/hop_relay.py: the least one more hop costs in Python
HOP_SOCAT = "ssh -L behind socat"                 # the same hop in C (where socat is on PATH)
LOCAL_USER = "bench_local"


@dataclass(frozen=True)
class LoadPlan:
    rounds: int = 5
    slap_queries: int = 20000        # 50 clients: at ~30k q/s fewer queries measure mostly the 50 connects
    slap_clients: int = 50
    sysbench_seconds: int = 10
    sysbench_threads: tuple[int, ...] = (4, 16)
    sysbench_rows: int = 10000
    idle_tunnels: int = 10
    idle_seconds: float = 20.0


QUICK = LoadPlan(rounds=5, slap_queries=1500, sysbench_seconds=2, sysbench_rows=2000, idle_seconds=6.0)


@dataclass
class Forwarding:
    """One forwarder under test: its local port and process."""
    name: str
    port: int
    pid: int
    stop: Callable[[], None]
    helpers: tuple[int, ...] = ()     # processes it started that forward too (the ssh master)
    user: str | None = None           # who the clients log in as (None: the cluster's admin)
    password: str | None = None

    @property
    def pids(self) -> list[int]:
        return [self.pid, *self.helpers]


# ---- /proc ----------------------------------------------------------------------------------

def cpu_seconds(pids: int | list[int]) -> float:
    """utime + stime of the processes (each one's own threads)."""
    total = 0
    for pid in [pids] if isinstance(pids, int) else pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / os.sysconf("SC_CLK_TCK")


def rss_mib_and_threads(pids: int | list[int]) -> tuple[float, int]:
    rss, threads = 0.0, 0
    for pid in [pids] if isinstance(pids, int) else pids:
        status = Path(f"/proc/{pid}/status").read_text()
        rss += int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024
        threads += int(re.search(r"Threads:\s+(\d+)", status).group(1))
    return rss, threads


def ssh_children(pid: int) -> tuple[int, ...]:
    """The ``ssh`` processes ``pid`` started (the OpenSSH masters of client openssh)."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                stat = Path(f"/proc/{entry}/stat").read_text()
                comm, rest = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()
                if comm == "ssh" and int(rest[1]) == pid:
                    found.append(int(entry))
    return tuple(found)


def context_switches(pids: list[int]) -> int:
    total = 0
    for pid in pids:
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
    return total


# ---- clients --------------------------------------------------------------------------------

def slap_qps(port: int, cluster: Any, queries: int, clients: int, user: str | None = None,
             password: str | None = None) -> float:
    """mariadb-slap's queries/s: ``queries`` SELECT 1 over ``clients`` connections."""
    argv = ["mariadb-slap", "--host=127.0.0.1", f"--port={port}", f"--user={user or cluster.admin_user}",
            f"--create-schema={cluster.database}", "--query=SELECT 1", f"--concurrency={clients}",
            f"--number-of-queries={queries}", "--iterations=1"]
    env = dict(os.environ, MYSQL_PWD=password or cluster.admin_password)
    out = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    m = re.search(r"Average number of seconds to run all queries: ([\d.]+)", out.stdout)
    if out.returncode != 0 or not m:
        raise RuntimeError(f"mariadb-slap failed: {(out.stderr or out.stdout).strip()[-300:]}")
    return queries / max(float(m.group(1)), 1e-6)


def _target(port: int, cluster: Any, user: str | None = None, password: str | None = None) -> Any:
    from bench import workload
    return workload.Target("127.0.0.1", port, user or cluster.admin_user, password or cluster.admin_password,
                           cluster.database)


def with_cpu(pids: list[int], fn: Callable[[], Any]) -> tuple[Any, float]:
    before = cpu_seconds(pids)
    result = fn()
    return result, cpu_seconds(pids) - before


# ---- the paths ------------------------------------------------------------------------------

def _openssh(info: Any, remote_port: int) -> Forwarding:
    from bench.bench_tunnel import start_openssh, wait_for

    lab = type("Lab", (), {"bastion": type("B", (), {"user": info.ssh_user, "client_key": info.ssh_key_file,
                                                     "port": info.ssh_port})(),
                           "known_hosts": info.known_hosts, "ports": {}})()
    proc, port = start_openssh(lab, False, remote_port)
    wait_for(lambda: _can_connect(port), 30, "ssh -L")
    return Forwarding(REFERENCE, port, proc.pid, lambda: (proc.kill(), proc.wait(10)))


def _dbtunneld(info: Any, remote_port: int, name: str, count: int = 1, source: str | None = None,
               secrets: dict[str, str] | None = None, **settings: Any) -> tuple[Forwarding, list[int]]:
    """``count`` tunnels in one child process (dbtunneld from ``source`` when given)."""
    from bench.bench_tunnel import Child

    spec = {"mode": "tunnels", "kind": "ssh", "count": count, "user": info.ssh_user, "key": info.ssh_key_file,
            "host_key": info.host_key, "mysql_port": remote_port, "remote_port": remote_port,
            "ssh_port": info.ssh_port, "ssm_url": "", **settings}
    saved = os.environ.get("PYTHONPATH")
    if source:
        os.environ["PYTHONPATH"] = f"{source}{os.pathsep}{Path(__file__).resolve().parent.parent}"
    try:
        child = Child(spec, secrets)
    finally:
        if source:
            os.environ.pop("PYTHONPATH") if saved is None else os.environ.__setitem__("PYTHONPATH", saved)
    ports = [int(p) for p in child.expect("READY")]
    masters = ssh_children(child.proc.pid)
    return Forwarding(name, ports[0], child.proc.pid, lambda: _stop_all(child.stop, masters), masters), ports


def _local_login(info: Any, cluster: Any) -> Forwarding:
    """The default login (``login = "local"``) on the OpenSSH engine: clients log in as a local
    user; the tunnel logs in upstream as the "lease" (here the cluster's admin) and relays."""
    import secrets

    password = secrets.token_urlsafe(18)
    path, _ = _dbtunneld(info, cluster.port, OURS_LOCAL, client="openssh",
                         local_login={"user": LOCAL_USER, "lease_user": cluster.admin_user},
                         secrets={"password": password, "lease_password": cluster.admin_password})
    return replace(path, user=LOCAL_USER, password=password)


def _hop(name: str, argv: list[str], ssh_l: Forwarding) -> Forwarding:
    """``argv`` relaying a free loopback port (``PORT`` in argv) to ``ssh_l``'s."""
    import socket

    from bench.bench_tunnel import wait_for

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([a.replace("PORT", str(port)) for a in argv], stdin=subprocess.PIPE,
                            start_new_session=True)
    wait_for(lambda: _can_connect(port), 30, name)

    def stop() -> None:
        proc.kill()
        proc.wait(10)
    return Forwarding(name, port, proc.pid, stop, ssh_l.pids)


def _hops(ssh_l: Forwarding) -> list[Forwarding]:
    """One more relay in front of ``ssh -L``: in Python (``bench/hop_relay.py``), and in C
    (socat, one process per connection) where it is installed. CPU counts the hop and the ssh."""
    import shutil
    import sys

    hops = [_hop(HOP_PYTHON, [sys.executable, "-m", "bench.hop_relay", "PORT", str(ssh_l.port)], ssh_l)]
    if shutil.which("socat"):
        hops.append(_hop(HOP_SOCAT, ["socat", "TCP-LISTEN:PORT,bind=127.0.0.1,fork,reuseaddr,nodelay,backlog=128",
                                     f"TCP:127.0.0.1:{ssh_l.port},nodelay"], ssh_l))
    return hops


def _stop_all(stop: Callable[[], None], pids: tuple[int, ...]) -> None:
    """The child stops its masters itself; any left over (a child killed) are stopped by pid."""
    stop()
    for pid in pids:
        with contextlib.suppress(OSError):
            if Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z":
                os.kill(pid, 9)


def _can_connect(port: int) -> bool:
    import socket
    try:
        socket.create_connection(("127.0.0.1", port), 1).close()
        return True
    except OSError:
        return False


# ---- the measurement ------------------------------------------------------------------------

def load_round(paths: list[Forwarding], cluster: Any, plan: LoadPlan, rows: dict[str, dict[str, list[float]]]) -> None:
    from bench import workload

    for p in paths:
        qps, cpu = with_cpu(p.pids, lambda: slap_qps(p.port, cluster, plan.slap_queries, plan.slap_clients,
                                                     p.user, p.password))
        _add(rows, p.name, "slap qps", qps)
        _add(rows, p.name, "slap cpu us/query", cpu * 1e6 / plan.slap_queries)
    for threads in plan.sysbench_threads:
        for p in paths:
            t0 = time.monotonic()
            r, cpu = with_cpu(p.pids, lambda: workload.run(_target(p.port, cluster, p.user, p.password),
                                                          seconds=plan.sysbench_seconds,
                                                          threads=threads, tables=1, table_size=plan.sysbench_rows))
            queries = max(r.qps * (time.monotonic() - t0), 1.0)
            _add(rows, p.name, f"sysbench {threads} tps", r.tps)
            _add(rows, p.name, f"sysbench {threads} p95 ms", r.latency_p95_ms)
            _add(rows, p.name, f"sysbench {threads} cpu us/query", cpu * 1e6 / queries)


def _add(rows: dict[str, dict[str, list[float]]], name: str, key: str, value: float) -> None:
    rows.setdefault(name, {}).setdefault(key, []).append(value)


SETTLE = 6.0
IDLE_KEEPALIVE = 60.0      # the second idle figure: what is left beyond (rarer) keepalives


def idle_wakeups(info: Any, remote_port: int, plan: LoadPlan, ref: str | None) -> dict[str, float]:
    """Wake-ups/s of ``idle_tunnels`` idle tunnels: one dbtunneld process (default keepalive
    every 5 s, and every 60 s) vs as many ssh -L (OpenSSH sends no keepalives by default)."""
    groups: dict[str, list[int]] = {}
    stops: list[Callable[[], None]] = []
    try:
        for name, extra in ((OURS, {}), (f"{OURS}, keepalive {IDLE_KEEPALIVE:g} s",
                                         {"keepalive_interval": IDLE_KEEPALIVE})):
            ours, _ = _dbtunneld(info, remote_port, name, plan.idle_tunnels, **extra)
            stops.append(ours.stop)
            groups[name] = [ours.pid]
        mine, _ = _dbtunneld(info, remote_port, OURS_OPENSSH, plan.idle_tunnels, client="openssh")
        stops.append(mine.stop)
        groups[OURS_OPENSSH] = mine.pids
        if ref:
            old, _ = _dbtunneld(info, remote_port, f"{OURS} (ref)", plan.idle_tunnels, ref)
            stops.append(old.stop)
            groups[old.name] = [old.pid]
        ssh = [_openssh(info, remote_port) for _ in range(plan.idle_tunnels)]
        stops.extend(p.stop for p in ssh)
        groups[REFERENCE] = [p.pid for p in ssh]
        time.sleep(2.0)                               # start-up work settles
        before = {k: context_switches(v) for k, v in groups.items()}
        time.sleep(plan.idle_seconds)
        after = {k: context_switches(v) for k, v in groups.items()}
    finally:
        for stop in stops:
            with contextlib.suppress(Exception):
                stop()
    return {k: (after[k] - before[k]) / plan.idle_seconds for k in groups}


def run(plan: LoadPlan, ref: str | None = None, progress: Callable[[str], None] = print) -> dict[str, Any]:
    from bench import workload
    from dbtunneld.sandbox.stack import start_stack

    with start_stack(vault=False, aws=False, sso=False, ssm=False, clusters=("orders",)) as stack:
        info, cluster = stack.info, stack.info.clusters["orders"]
        workload.prepare(_target(cluster.port, cluster), tables=1, table_size=plan.sysbench_rows)
        paths: list[Forwarding] = []
        rows: dict[str, dict[str, list[float]]] = {}
        try:                                             # (each started path is stopped, even on failure)
            paths.append(_dbtunneld(info, cluster.port, OURS)[0])
            paths.append(ssh_l := _openssh(info, cluster.port))
            paths.append(_dbtunneld(info, cluster.port, OURS_OPENSSH, client="openssh")[0])
            paths.append(_local_login(info, cluster))
            paths.extend(_hops(ssh_l))
            if ref:
                paths.append(_dbtunneld(info, cluster.port, f"{OURS} (ref)", source=ref)[0])
            for p in paths:                              # warm up (the first run is always slower)
                slap_qps(p.port, cluster, 200, 10, p.user, p.password)
            memory_before = {p.name: rss_mib_and_threads(p.pids) for p in paths}
            for n in range(plan.rounds):
                load_round(paths, cluster, plan, rows)
                progress(f"  load round {n + 1}/{plan.rounds}")
            time.sleep(SETTLE)                           # opener threads idle out after 5 s
            memory_after = {p.name: rss_mib_and_threads(p.pids) for p in paths}
        finally:
            for p in reversed(paths):                    # the hops before the ssh -L they use
                with contextlib.suppress(Exception):
                    p.stop()
        progress("  idle tunnels")
        try:
            idle = idle_wakeups(info, cluster.port, plan, ref)
        except Exception as exc:                         # the load figures stand on their own
            progress(f"  idle tunnels not measured: {type(exc).__name__}: {exc}")
            idle = {}
    return {"rows": {name: {k: statistics.median(v) for k, v in keys.items()} for name, keys in rows.items()},
            "memory_before": memory_before, "memory_after": memory_after, "idle_wakeups_per_s": idle,
            "plan": plan.__dict__}


# ---- figures --------------------------------------------------------------------------------

METRICS = (("slap qps", "mariadb-slap 50 clients SELECT 1", "q/s", True, ">= 0.9x"),
           ("sysbench 4 tps", "sysbench oltp_read_only 4 threads", "tps", True, ">= 0.9x"),
           ("sysbench 4 p95 ms", "sysbench 4 threads p95", "ms", False, ""),
           ("sysbench 16 tps", "sysbench oltp_read_only 16 threads", "tps", True, ">= 0.9x"),
           ("sysbench 16 p95 ms", "sysbench 16 threads p95", "ms", False, ""),
           ("slap cpu us/query", "forwarder CPU per query (slap)", "us", False, "<= 1.3x"),
           ("sysbench 4 cpu us/query", "forwarder CPU per query (sysbench 4)", "us", False, "<= 1.3x"),
           ("sysbench 16 cpu us/query", "forwarder CPU per query (sysbench 16)", "us", False, "<= 1.3x"))


TARGETED = (OURS, OURS_OPENSSH, OURS_LOCAL)


def figures(out: dict[str, Any]) -> list[Figure]:
    rows, ref = out["rows"], out["rows"].get(REFERENCE, {})
    result = []
    for key, label, unit, higher, target in METRICS:
        for name in rows:
            if name != REFERENCE:
                result.append(Figure(SECTION, label, name, rows[name].get(key), unit, REFERENCE, ref.get(key),
                                     higher_is_better=higher, target=target if name in TARGETED else ""))
    for name, (rss, threads) in out["memory_after"].items():
        if name in (HOP_PYTHON, HOP_SOCAT):          # references for the hop's speed only
            continue
        rss0, threads0 = out["memory_before"][name]
        result.append(Figure(SECTION, f"RSS after {out['plan']['rounds']} load rounds (+{SETTLE:g} s)", name, rss, "MiB",
                             "before the rounds", rss0, higher_is_better=False,
                             target="+5 MiB at most" if name in TARGETED else ""))
        result.append(Figure(SECTION, f"threads after {out['plan']['rounds']} load rounds (+{SETTLE:g} s)", name, threads, "",
                             "before the rounds", threads0, higher_is_better=False))
    idle = out["idle_wakeups_per_s"]
    for name, value in idle.items():
        if name != REFERENCE:
            result.append(Figure(SECTION, f"idle wake-ups/s, {out['plan']['idle_tunnels']} tunnels", name, value,
                                 "/s", REFERENCE, idle.get(REFERENCE), higher_is_better=False,
                                 target="<= 1/s" if name in (OURS, OURS_OPENSSH) else ""))
    return result


def headline(out: dict[str, Any]) -> dict[str, float | None]:
    """The top-level numbers of bench.json: the default engine's (``bastion.client = "auto"``, i.e.
    OpenSSH where ssh is on PATH) pass-through tunnel; the same for client paramiko with the prefix
    ``paramiko_client_``, for the local login (the default login) with ``local_login_``, and for the
    reference relay hops in front of ``ssh -L`` with ``relay_hop_python_`` / ``relay_hop_socat_``."""
    both = _headline(out, OURS_OPENSSH)
    both.update({f"paramiko_client_{k}": v for k, v in _headline(out, OURS).items()})
    for prefix, name in (("local_login_", OURS_LOCAL), ("relay_hop_python_", HOP_PYTHON), ("relay_hop_socat_", HOP_SOCAT)):
        if name in out["rows"]:
            both.update({f"{prefix}{k}": v for k, v in _headline(out, name).items() if not k.startswith("idle")})
    return both


def _headline(out: dict[str, Any], name: str) -> dict[str, float | None]:
    ours, ref = out["rows"].get(name, {}), out["rows"].get(REFERENCE, {})

    def ratio(*keys: str) -> float | None:
        pairs = [(ours.get(k), ref.get(k)) for k in keys]
        if not all(a and b for a, b in pairs):
            return None
        return round(statistics.fmean(a / b for a, b in pairs), 3)

    return {"slap_qps_ratio_vs_openssh": ratio("slap qps"),
            "sysbench_tps_ratio_vs_openssh": ratio("sysbench 4 tps", "sysbench 16 tps"),
            "cpu_per_query_ratio_vs_ssh": ratio("slap cpu us/query", "sysbench 4 cpu us/query",
                                                "sysbench 16 cpu us/query"),
            "idle_wakeups_per_s_10_tunnels": _rounded(out["idle_wakeups_per_s"].get(name))}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def main(argv: list[str] | None = None) -> int:
    import json

    from bench import report

    parser = argparse.ArgumentParser(prog="python -m bench.data_path", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ref", help="another checkout whose dbtunneld is measured too (old vs new)")
    parser.add_argument("--seconds", type=int, help="sysbench seconds per run (default: 10, quick: 2)")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else LoadPlan()
    if args.seconds:
        plan = replace(plan, sysbench_seconds=args.seconds)
    out = run(plan, args.ref)
    results = report.Results(figures=figures(out), headline=headline(out))
    print(report.render_table(results))
    print(json.dumps(results.headline, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
