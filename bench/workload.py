"""A real client workload: sysbench ``oltp_read_only`` (Debian package) against a MySQL port.

``prepare`` creates a small table set with an account that may write (the cluster's admin, on the
direct port), ``run`` drives the read-only OLTP mix for a few seconds through any port (direct,
``ssh -L``, dbtunneld) and parses transactions/s, queries/s and latency, ``cleanup`` drops the
tables. Passwords go to sysbench through ``MYSQL_PWD`` in its environment, never its arguments.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass

TEST = "oltp_read_only"


@dataclass(frozen=True)
class Target:
    host: str
    port: int
    user: str
    password: str
    database: str


@dataclass(frozen=True)
class Result:
    tps: float
    qps: float
    latency_avg_ms: float
    latency_p95_ms: float
    errors: int
    seconds: float


def available() -> bool:
    return shutil.which("sysbench") is not None


def _argv(t: Target, tables: int, table_size: int, *extra: str) -> list[str]:
    return ["sysbench", TEST, "--db-driver=mysql", f"--mysql-host={t.host}", f"--mysql-port={t.port}",
            f"--mysql-user={t.user}", f"--mysql-db={t.database}", f"--tables={tables}",
            f"--table-size={table_size}", *extra]


def _sysbench(t: Target, argv: list[str], timeout: float) -> str:
    env = dict(os.environ, MYSQL_PWD=t.password)
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise RuntimeError(f"sysbench {argv[-1]} failed ({proc.returncode}): {' | '.join(tail)}")
    return proc.stdout


def prepare(t: Target, tables: int = 2, table_size: int = 10000, timeout: float = 120.0) -> None:
    _sysbench(t, _argv(t, tables, table_size, "prepare"), timeout)


def cleanup(t: Target, tables: int = 2, timeout: float = 60.0) -> None:
    _sysbench(t, _argv(t, tables, 1, "cleanup"), timeout)


def run(t: Target, seconds: float = 10.0, threads: int = 4, tables: int = 2, table_size: int = 10000) -> Result:
    argv = _argv(t, tables, table_size, f"--time={int(seconds)}", f"--threads={threads}",
                 "--report-interval=0", "run")
    return parse(_sysbench(t, argv, seconds + 60.0), seconds)


def _number(pattern: str, text: str) -> float:
    m = re.search(pattern, text)
    if not m:
        raise ValueError(f"sysbench output has no {pattern!r}")
    return float(m.group(1))


def parse(text: str, seconds: float) -> Result:
    """The figures of sysbench 1.0's summary."""
    return Result(
        tps=_number(r"transactions:\s+\d+\s+\(([\d.]+) per sec", text),
        qps=_number(r"queries:\s+\d+\s+\(([\d.]+) per sec", text),
        latency_avg_ms=_number(r"avg:\s+([\d.]+)", text),
        latency_p95_ms=_number(r"95th percentile:\s+([\d.]+)", text),
        errors=int(_number(r"ignored errors:\s+(\d+)", text)),
        seconds=seconds,
    )
