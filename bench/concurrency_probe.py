"""Round-trip latency through one SSH connection with N busy channels at once.

N client threads each hold one connection to the sandbox's echo server (``E`` of
``ssm_testkit.DataServer``) and do small request/response round trips; p50/p95 per N for
dbtunneld's ssh tunnel (a child process, as the daemon runs it) and OpenSSH ``ssh -L``.

    .venv/bin/python -m bench.concurrency_probe [--seconds 3] [--size 64] [--threads 1,4,8]
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

from bench.bench_tunnel import Child, connect, lab, openssh_path, start_openssh, wait_for


def round_trips(port: int, size: int, seconds: float, out: list[float], start: threading.Barrier) -> None:
    payload = b"q" * size
    with connect(port) as sock:
        sock.sendall(b"E\n")
        start.wait()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            sock.sendall(payload)
            got = 0
            while got < size:
                chunk = sock.recv(size - got)
                if not chunk:
                    raise EOFError("echo server closed")
                got += len(chunk)
            out.append(time.perf_counter() - t0)


def run_threads(threads: int, seconds: float, work, *args) -> dict[str, float]:
    """Run ``work(*args, seconds, samples, barrier)`` in ``threads`` threads; latency figures in ms."""
    samples: list[list[float]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads)
    workers = [threading.Thread(target=work, args=(*args, seconds, s, barrier)) for s in samples]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    flat = sorted(x for s in samples for x in s)
    return {"n": len(flat), "rps": len(flat) / seconds, "p50": statistics.median(flat) * 1e3,
            "p95": flat[int(len(flat) * 0.95)] * 1e3, "max": flat[-1] * 1e3}


def measure(port: int, threads: int, size: int, seconds: float) -> dict[str, float]:
    return run_threads(threads, seconds, round_trips, port, size)


def report(label: str, port: int, counts: list[int], size: int, seconds: float) -> None:
    measure(port, 1, size, 0.3)                            # warm up
    for n in counts:
        r = measure(port, n, size, seconds)
        print(f"{label:16} N={n:<2} size={size:<6} {r['rps']:8.0f} rt/s  p50 {r['p50']:6.2f} ms  "
              f"p95 {r['p95']:6.2f} ms  max {r['max']:6.1f} ms", flush=True)


def queries(port: int, cluster, seconds: float, out: list[float], start: threading.Barrier) -> None:
    """sysbench-like: a point select and a 100-row range select, each timed."""
    import pymysql

    db = pymysql.connect(host="127.0.0.1", port=port, user=cluster.admin_user,
                         password=cluster.admin_password, database=cluster.database)
    with db, db.cursor() as cur:
        start.wait()
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            t0 = time.perf_counter()
            if i % 2:
                cur.execute("SELECT REPEAT('x', 120) FROM seq_1_to_100")
            else:
                cur.execute("SELECT 1")
            cur.fetchall()
            out.append(time.perf_counter() - t0)
            i += 1


def measure_mysql(port: int, cluster, threads: int, seconds: float) -> dict[str, float]:
    return run_threads(threads, seconds, queries, port, cluster)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (Linux /proc)."""
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_by_command() -> dict[str, float]:
    """CPU seconds of every live process, summed by command name (sshd, mariadbd, sysbench...)."""
    import os

    out: dict[str, float] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                comm = open(f"/proc/{name}/comm").read().strip()
                out[comm] = out.get(comm, 0.0) + cpu_seconds(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def sysbench_report(label: str, port: int, pid: int, cluster, counts: list[int], seconds: float) -> None:
    from bench import workload

    target = workload.Target("127.0.0.1", port, cluster.admin_user, cluster.admin_password, cluster.database)
    workload.run(target, seconds=3, threads=4)            # warm up (the first run is always slower)
    for n in counts:
        cpu0, t0, by0 = cpu_seconds(pid), time.monotonic(), cpu_by_command()
        r = workload.run(target, seconds=seconds, threads=n)
        cpu = (cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
        by1 = cpu_by_command()
        others = {k: (by1[k] - by0.get(k, 0.0)) * 1e6 / max(r.qps * seconds, 1) for k in ("sshd", "mariadbd")
                  if k in by1}
        print(f"{label:16} sysbench N={n:<2} {r.tps:7.1f} tps  avg {r.latency_avg_ms:6.2f} ms  "
              f"p95 {r.latency_p95_ms:6.2f} ms  forwarder CPU {cpu * 100:3.0f} %  "
              f"{cpu * 1e6 / max(r.qps, 1):5.0f} us/query  "
              + "  ".join(f"{k} {v:4.0f} us/query" for k, v in others.items()), flush=True)


def mysql_main(counts: list[int], seconds: float, only: str | None, sysbench: bool = False) -> None:
    from dbtunneld.sandbox.stack import start_stack

    with start_stack(vault=False, aws=False, sso=False, ssm=False, clusters=("orders",)) as stack:
        info, cluster = stack.info, stack.info.clusters["orders"]
        spec = {"mode": "tunnels", "kind": "ssh", "count": 1, "user": info.ssh_user, "key": info.ssh_key_file,
                "host_key": info.host_key, "mysql_port": cluster.port, "remote_port": cluster.port,
                "ssh_port": info.ssh_port, "ssm_url": ""}
        paths = []
        if only != "openssh":
            child = Child(spec)
            paths.append(("dbtunneld ssh", int(child.expect("READY")[0]), child.proc.pid, child.stop))
            print(f"dbtunneld child pid {child.proc.pid}", flush=True)
        if only != "dbtunneld":
            lab_ = type("L", (), {"bastion": type("B", (), {"user": info.ssh_user, "client_key": info.ssh_key_file,
                                                            "port": info.ssh_port})(),
                                  "known_hosts": info.known_hosts, "ports": {}})()
            proc, oport = start_openssh(lab_, False, cluster.port)
            wait_for(lambda: _can_connect(oport), 30, "ssh -L")
            paths.append(("OpenSSH ssh -L", oport, proc.pid, proc.kill))
        if sysbench:
            from bench import workload
            workload.prepare(workload.Target("127.0.0.1", cluster.port, cluster.admin_user,
                                             cluster.admin_password, cluster.database))
        try:
            for label, port, pid, _ in paths:
                if sysbench:
                    sysbench_report(label, port, pid, cluster, counts, seconds)
                    continue
                measure_mysql(port, cluster, 1, 0.3)
                for n in counts:
                    r = measure_mysql(port, cluster, n, seconds)
                    print(f"{label:16} mysql N={n:<2} {r['rps']:8.0f} q/s  p50 {r['p50']:6.2f} ms  "
                          f"p95 {r['p95']:6.2f} ms  max {r['max']:6.1f} ms", flush=True)
        finally:
            for _, _, _, stop in paths:
                stop()


def _can_connect(port: int) -> bool:
    try:
        connect(port, 1).close()
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--size", default="64,4096")
    ap.add_argument("--threads", default="1,4,8")
    ap.add_argument("--only", choices=("dbtunneld", "openssh"), default=None)
    ap.add_argument("--mysql", action="store_true", help="PyMySQL queries to the sandbox MariaDB instead of echo")
    ap.add_argument("--sysbench", action="store_true", help="sysbench oltp_read_only (bench.workload) instead")
    args = ap.parse_args()
    if args.mysql or args.sysbench:
        return mysql_main([int(x) for x in args.threads.split(",")], args.seconds, args.only, args.sysbench)
    counts = [int(x) for x in args.threads.split(",")]
    sizes = [int(x) for x in args.size.split(",")]
    with lab() as the_lab:
        if args.only != "openssh":
            child = Child(the_lab.spec("ssh"))
            try:
                port = int(child.expect("READY")[0])
                print(f"dbtunneld child pid {child.proc.pid} port {port}", flush=True)
                for size in sizes:
                    report("dbtunneld ssh", port, counts, size, args.seconds)
            finally:
                child.stop()
        if args.only != "dbtunneld":
            with openssh_path(the_lab, False) as port:
                for size in sizes:
                    report("OpenSSH ssh -L", port, counts, size, args.seconds)


if __name__ == "__main__":
    main()
