"""A new connection's wait for the MySQL server's greeting, per path, on the sandbox stack.

``python -m bench.greeting_first_byte [--reps 20]``

MySQL speaks first: sshd connects to the server, sends the open confirmation, then the greeting as
the channel's first data. sshd leaves Nagle on for forwarding-only connections, so the greeting
waits until the confirmation is acknowledged, and the client's kernel delays that ACK (40 ms on
Linux). Printed per path, medians over ``--reps``: connect to the first byte of the greeting, and a
whole PyMySQL connect (login included). Paths: direct TCP, OpenSSH ``ssh -L``, dbtunneld's ssh
tunnel with client paramiko (which answers each open at once: ``ssh.SshConnection._ack_now``) and
with client openssh (an ``ssh -M`` master, which cannot be told to).
"""

from __future__ import annotations

import argparse
import socket
import statistics
import time
from typing import Any, Callable


def greeting_ms(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if not sock.recv(4096):
            raise RuntimeError(f"port {port} closed without a greeting")
        return (time.perf_counter() - started) * 1000


def pymysql_connect_ms(port: int, cluster: Any) -> float:
    import pymysql

    started = time.perf_counter()
    conn = pymysql.connect(host="127.0.0.1", port=port, user=cluster.admin_user, password=cluster.admin_password,
                           database=cluster.database, connect_timeout=10)
    elapsed = (time.perf_counter() - started) * 1000
    conn.close()
    return elapsed


def median_of(reps: int, fn: Callable[[], float]) -> float:
    return statistics.median(fn() for _ in range(reps))


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.greeting_first_byte", description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    from bench import data_path as dp
    from dbtunneld.sandbox.stack import start_stack

    with start_stack(vault=False, aws=False, sso=False, ssm=False, clusters=("orders",)) as stack:
        info, cluster = stack.info, stack.info.clusters["orders"]
        paths: list[dp.Forwarding] = []
        try:
            paths.append(dp._openssh(info, cluster.port))
            paths.append(dp._dbtunneld(info, cluster.port, dp.OURS)[0])
            paths.append(dp._dbtunneld(info, cluster.port, dp.OURS_OPENSSH, client="openssh")[0])
            print(f"{'path':34} {'first byte of the greeting':>28} {'PyMySQL connect':>17}   (medians of {args.reps})")
            for name, port in [("direct TCP", cluster.port)] + [(p.name, p.port) for p in paths]:
                greeting = median_of(args.reps, lambda: greeting_ms(port))
                login = median_of(args.reps, lambda: pymysql_connect_ms(port, cluster))
                print(f"{name:34} {greeting:25.1f} ms {login:14.1f} ms")
        finally:
            for p in reversed(paths):
                p.stop()


if __name__ == "__main__":
    main()
