"""login = "local" vs login = "lease" vs OpenSSH ``ssh -L``, on the sandbox stack (ssh transport).

Per path: connection set-up (connect + login + SELECT 1 + close, sequential, median and p95) and
sysbench ``oltp_read_only`` (4 threads; ``--threads 4,16``) as the same leased read-only user. The local login adds
one round of its own (our greeting) and the upstream login happens on the already open channel.

    PYTHONPATH=. python -m bench.local_login_bench [--seconds 3] [--connects 20] [--rounds 3] [--threads 4,16] [--clients auto,paramiko]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from bench import workload
from bench.daemon_bench import daemon_lab, mysql_greeting, query
from dbtunneld.sandbox.daemonproc import wait_until


def connect_times(port: int, user: str, password: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        started = time.perf_counter()
        query(port, user, password)
        out.append((time.perf_counter() - started) * 1000)
    return out


def measure(paths: dict, database: str, args: argparse.Namespace) -> None:
    """``--rounds`` rounds, the order of the paths rotated each round (a shared machine's load
    drifts); medians over the rounds."""
    setup: dict[str, list[float]] = {n: [] for n in paths}
    tps: dict[tuple[str, int], list[float]] = {(n, t): [] for n in paths for t in args.threads}
    names = list(paths)
    for i in range(args.rounds):
        for name in names[i % len(names):] + names[:i % len(names)]:
            port, user, password = paths[name]
            setup[name] += connect_times(port, user, password, args.connects)
            for threads in args.threads:
                r = workload.run(workload.Target("127.0.0.1", port, user, password, database),
                                 args.seconds, threads=threads, tables=2, table_size=10000)
                tps[name, threads].append(r.tps)
    for name in names:
        times = sorted(setup[name])
        print(f"{name:32} connect+login+SELECT 1+close median {statistics.median(times):6.2f} ms "
              f"p95 {times[int(len(times) * 0.95) - 1]:6.2f} ms" + "".join(
                  f"   sysbench {t} threads median {statistics.median(tps[name, t]):6.1f} tps "
                  f"(rounds: {', '.join(f'{x:.0f}' for x in tps[name, t])})" for t in args.threads))


def connected_daemon(lab, name: str, login: str, client: str = "auto"):
    d = lab.daemon(name, clusters=("orders",))
    config = d.config.replace('name = "orders"', f'name = "orders"\nlogin = "{login}"', 1)
    d.write_config(config.replace('transport = "ssh"\n', f'transport = "ssh"\nclient = "{client}"\n', 1))
    d.start()
    d.sign_in()
    d.cli("connect", "orders", "--wait", "60")
    return d


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--connects", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", default="4", type=lambda v: [int(x) for x in v.split(",")],
                    help="sysbench thread counts, comma-separated (e.g. 4,16)")
    ap.add_argument("--clients", default="auto", help='bastion.client values, comma-separated (e.g. "auto,paramiko")')
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="dbt-llb-", dir="/tmp"))
    with daemon_lab(root, quick=True) as lab:
        c = lab.stack.clusters["orders"]
        admin = workload.Target("127.0.0.1", c.port, c.admin_user, c.admin_password, c.database)
        workload.prepare(admin, 2, 10000)
        try:
            paths = {}
            for client in args.clients.split(","):
                for login in ("local", "lease"):
                    d = connected_daemon(lab, f"{login}-{client}", login, client)
                    cr = d.creds("orders")
                    paths[f"login={login}, client {client}"] = (cr["port"], cr["username"], cr["password"])
            proc, ssh_port = lab.openssh(c.port)
            wait_until(lambda: mysql_greeting(ssh_port, 2), 30)
            paths["OpenSSH ssh -L"] = (ssh_port, cr["username"], cr["password"])   # the last one's lease
            try:
                measure(paths, c.database, args)
            finally:
                proc.kill()
                proc.wait(10)
        finally:
            workload.cleanup(admin, 2)


if __name__ == "__main__":
    main()
