"""Idle wake-ups of a real daemon with N connected tunnels, per thread name (issue 17):
``python -m bench.idle_wakeups [--tunnels 10] [--seconds 20] [--client paramiko|openssh]``.

A private sandbox stack and a ``dbtunneld daemon`` (``sandbox.daemonproc``) with N clusters on
the ``ssh`` transport, every tunnel connected, then, after a settle, a window of ``--seconds``:
voluntary + involuntary context switches of every thread (``/proc/PID/task/*/status``, as
``bench.data_path`` counts them) and of the ``ssh -M`` masters the daemon started, per second,
grouped by thread name. Python threads get their names as native names (``comm``) through a
``sitecustomize`` on the daemon's PYTHONPATH that only this bench uses (prctl PR_SET_NAME, Linux).
Prints one JSON object: total and per-name wake-ups/s ([all, voluntary, involuntary]).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import re
import tempfile
import time
from pathlib import Path
from typing import Any

# bench only: the daemon's Python threads name themselves natively, so /proc shows their names
SITECUSTOMIZE = '''
import ctypes, os, threading
_libc = ctypes.CDLL(None)
_run = threading.Thread._bootstrap_inner
def _named(self):
    try:
        _libc.prctl(15, self.name.encode()[-15:], 0, 0, 0)
        with open(os.environ["BENCH_THREAD_NAMES"], "a") as f:
            f.write(f"{threading.get_native_id()} {self.name}\\n")
    except Exception:
        pass
    _run(self)
threading.Thread._bootstrap_inner = _named
'''


def task_switches(pids: list[int], names: Path | None = None) -> dict[tuple[int, int], tuple[str, int, int]]:
    """(pid, tid) -> (name, voluntary, involuntary context switches so far); names of Python
    threads from the file the bench's ``sitecustomize`` writes."""
    full = dict(line.split(" ", 1) for line in names.read_text().splitlines()) if names and names.exists() else {}
    out: dict[tuple[int, int], tuple[str, int, int]] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{pid}/task").iterdir():
                with contextlib.suppress(OSError):
                    name = full.get(task.name) or (task / "comm").read_text().strip()
                    lines = (task / "status").read_text().splitlines()
                    voluntary = sum(int(line.split()[1]) for line in lines if line.startswith("voluntary_ctxt"))
                    involuntary = sum(int(line.split()[1]) for line in lines if line.startswith("nonvoluntary_ctxt"))
                    out[(pid, int(task.name))] = (name, voluntary, involuntary)
    return out


def per_name(before: dict[tuple[int, int], tuple[str, int, int]], after: dict[tuple[int, int], tuple[str, int, int]],
             seconds: float) -> dict[str, list[float]]:
    """Per thread name (digits folded): [wake-ups/s, of which voluntary, involuntary]."""
    rates: dict[str, list[float]] = {}
    for key, (name, voluntary, involuntary) in after.items():
        _, v0, i0 = before.get(key, (name, 0, 0))
        row = rates.setdefault(re.sub(r"\d+", "N", name), [0.0, 0.0, 0.0])
        row[1] += (voluntary - v0) / seconds
        row[2] += (involuntary - i0) / seconds
        row[0] = row[1] + row[2]
    ordered = sorted(rates.items(), key=lambda kv: -kv[1][0])
    return {k: [round(x, 2) for x in v] for k, v in ordered if v[0] > 0}


def measure(tunnels: int, seconds: float, client: str, settle: float = 5.0,
            tunnel_keys: dict[str, Any] | None = None, source: str | None = None) -> dict[str, Any]:
    """``source``: another tree whose ``dbtunneld`` the daemon runs (before/after figures)."""
    from bench.data_path import ssh_children
    from dbtunneld.sandbox.daemonproc import DaemonOptions, DaemonUnderTest
    from dbtunneld.sandbox.stack import start_stack

    with tempfile.TemporaryDirectory() as root, start_stack(home=Path(root) / "stack") as stack:
        site = Path(root) / "site"
        site.mkdir()
        (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
        repo = source or str(Path(__file__).resolve().parent.parent)
        options = DaemonOptions(clusters=("orders",), copies=tunnels - 1, tunnels=tunnel_keys)
        with DaemonUnderTest(stack, Path(root) / "d", options, env={"PYTHONPATH": f"{site}:{repo}",
                                                             "BENCH_THREAD_NAMES": str(site / "names")}) as d:
            if client != "default":                # the config's default ("auto" on main since c246f89)
                d.write_config(d.config_path.read_text().replace("[bastion]\n", f'[bastion]\nclient = "{client}"\n', 1))
            d.start()
            d.sign_in()
            names = [t["name"] for t in d.status()["tunnels"]]
            d.client.request("connect", all=True, wait=120, timeout=180)
            d.wait_up(names, timeout=180)
            pid = d.status()["pid"]
            time.sleep(settle)                          # start-up work (probes, opener threads) settles
            pids = [pid, *ssh_children(pid)]
            before = task_switches(pids, site / "names")
            time.sleep(seconds)
            after = task_switches(pids, site / "names")
    threads = per_name(before, after, seconds)
    counts = collections.Counter(re.sub(r"\d+", "N", name) for name, _, _ in after.values())
    return {"tunnels": len(names), "client": client, "seconds": seconds, "processes": len(pids),
            "wakeups_per_s": round(sum(v[0] for v in threads.values()), 2), "by_thread": threads,
            "threads": dict(counts.most_common())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_wakeups", description=__doc__.splitlines()[0])
    parser.add_argument("--tunnels", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--client", default="paramiko", choices=("paramiko", "openssh", "default"),
                        help="bastion.client (default: paramiko; 'default': leave the config's default)")
    parser.add_argument("--keepalive", type=float, help="tunnels.keepalive_interval (default: the config's default)")
    parser.add_argument("--source", help="a tree holding another dbtunneld/ for the daemon (e.g. `git archive main`); "
                        "run from inside it (python -m puts the current directory first on sys.path)")
    args = parser.parse_args(argv)
    keys = {"keepalive_interval": args.keepalive} if args.keepalive is not None else None
    print(json.dumps(measure(args.tunnels, args.seconds, args.client, tunnel_keys=keys, source=args.source), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
