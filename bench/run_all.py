"""The whole benchmark in one run (``./dev bench`` = ``python -m bench``): every dbtunneld figure
beside its reference measured in the same run, as one table, ``bench/results/bench.json`` and PNG
charts (``throughput.png``, ``rss_vs_tunnels.png``, ``sysbench.png``).

Stages (each one's failure is reported in the table and the run goes on):

1. tunnel paths, in ``bench_tunnel``'s lab (each party its own process): direct TCP, OpenSSH
   ``ssh -L``, sshtunnel, dbtunneld's tunnel in ``ssh``, ``ssm-ssh`` and ``ssm-port-forward``
   modes (SSM through the stand-in), on loopback and through a delay line adding 15 ms each way:
   bulk MB/s both ways, round trip p50/p99, new connection, worst first byte with 20 and 50
   connections opened at once;
2. the SSM data channel (``bench_ssm``): the native client vs AWS's session-manager-plugin (when
   installed) vs direct TCP, through the stand-in in ``realistic`` and ``fast`` modes: MB/s both
   ways, round trip, recovery after 5 % loss and after a websocket close;
2b. the data path under many clients (``data_path``): mariadb-slap and sysbench through
   dbtunneld's ``ssh`` tunnel and OpenSSH ``ssh -L`` in turns, CPU per query, RSS and threads
   over five load rounds, idle wake-ups of 10 tunnels; its ratios are bench.json's top-level keys;
3. on the sandbox stack, the real daemon process (``daemon_bench``): click-to-first-query,
   reconnect and detection after bastion faults, sysbench ``oltp_read_only``, idle CPU and memory
   with 1, 10 and 50 tunnels, and (in a thread, on its own stack with TTLs 120x shorter) Vault
   requests per hour.

``--quick`` runs everything smaller and shorter (idle with 1 and 10 tunnels, faults in ``ssh`` mode only).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench import report
from bench.report import Figure, Results


@dataclass(frozen=True)
class Plan:
    mb: int = 50                   # MB per bulk transfer (ssh paths)
    ssm_mb: int = 3                # MB per bulk transfer through SSM (realistic stand-in: ~0.5 MB/s down)
    rtt: int = 300                 # round trips on loopback (a fifth when delayed)
    reps: int = 3                  # bastion kills, click-to-query repetitions
    sysbench_seconds: float = 10.0
    sysbench_tables: int = 2
    sysbench_rows: int = 10000
    idle_counts: tuple[int, ...] = (1, 10, 50)
    idle_seconds: float = 10.0
    vault_seconds: float = 150.0
    fault_transports: tuple[str, ...] = ("ssh", "ssm-ssh")
    ssm_realistic_mb: float = 3.0  # bench_ssm: per transfer through the realistic stand-in (~1 MB/s)
    ssm_fast_mb: float = 30.0
    load: Any = None               # data_path.LoadPlan (None: its default)


QUICK = Plan(mb=10, ssm_mb=1, rtt=100, reps=1, sysbench_seconds=4.0, sysbench_tables=1, sysbench_rows=2000,
             idle_counts=(1, 10), idle_seconds=5.0, vault_seconds=60.0, fault_transports=("ssh",),
             ssm_realistic_mb=1.0, ssm_fast_mb=10.0, load="quick")


# ---------------------------------------------------------------------------- stage 1: tunnel paths

PATH_METRICS = (("down MB/s", "download", "MB/s", True), ("up MB/s", "upload", "MB/s", True),
                ("RTT p50 ms", "round trip p50", "ms", False), ("RTT p99 ms", "round trip p99", "ms", False),
                ("new conn p50 ms", "new connection to first byte p50", "ms", False),
                ("20-at-once worst first byte ms", "worst first byte, 20 at once", "ms", False),
                ("50-at-once worst first byte ms", "worst first byte, 50 at once", "ms", False))
OURS = ("dbtunneld ssh", "dbtunneld ssh, client auto", "dbtunneld ssm-ssh", "dbtunneld ssm-port-forward", "sshtunnel")
REFERENCE = "OpenSSH ssh -L"


def tunnel_paths(plan: Plan, results: Results, progress: Callable[[str], None]) -> None:
    from bench import bench_tunnel as bt
    from bench.extra_paths import port_forward_path

    paths = {**bt.PATHS, "dbtunneld ssm-port-forward": port_forward_path}
    tables: dict[str, dict[str, dict[str, float]]] = {}
    with bt.lab() as lab:
        for link, delayed in bt.LINKS.items():
            tables[link] = {}
            for name, path in paths.items():
                if delayed and name == "sshtunnel":
                    continue
                try:
                    tables[link][name] = _measure(bt, lab, path, delayed, name, plan)
                except Exception as exc:
                    results.failures.append(f"{link} / {name}: {type(exc).__name__}: {exc}")
                progress(f"{link} / {name}")
    for link, table in tables.items():
        results.add(path_figures(link, table))
    results.series["paths"] = tables


def _measure(bt: Any, lab: Any, path: Callable, delayed: bool, name: str, plan: Plan) -> dict[str, float]:
    n = (plan.ssm_mb if "ssm" in name else plan.mb) * bt.MB
    rtts = plan.rtt if not delayed else max(20, plan.rtt // 5)
    with path(lab, delayed) as port:
        figures = bt.measure_path(port, n, rtts)
        figures["50-at-once worst first byte ms"] = bt.burst_worst_ms(port, 50)
    return figures


def _target(name: str, metric: str, delayed: bool) -> str:
    if name not in ("dbtunneld ssh", "dbtunneld ssh, client auto"):
        return ""
    return {"down MB/s": ">= 3x" if delayed else ">= 0.7x", "up MB/s": ">= 3x" if delayed else ">= 0.7x",
            "RTT p50 ms": "<= 1.5x", "new conn p50 ms": "" if delayed else "<= 2 ms",
            "20-at-once worst first byte ms": "" if delayed else "<= 100 ms"}.get(metric, "")


def path_figures(link: str, table: dict[str, dict[str, float]]) -> list[Figure]:
    section = f"Tunnel paths, {link}"
    delayed = "delay" in link
    ref = table.get(REFERENCE, {})
    out = []
    for key, label, unit, higher in PATH_METRICS:
        if "direct TCP" in table:
            out.append(Figure(section, label, "direct TCP (ceiling)", table["direct TCP"].get(key), unit,
                              higher_is_better=higher))
        for name in OURS:
            if name in table:
                out.append(Figure(section, label, name, table[name].get(key), unit, REFERENCE, ref.get(key),
                                  higher_is_better=higher, target=_target(name, key, delayed)))
    return out


# ---------------------------------------------------------------------------- stage 2: the SSM data channel

def ssm_channel(plan: Plan, results: Results) -> None:
    """``bench_ssm``: native client vs the plugin vs direct, realistic and fast stand-in, recovery."""
    from bench import bench_ssm

    sizes = {"realistic": int(plan.ssm_realistic_mb * bench_ssm.MB), "fast": int(plan.ssm_fast_mb * bench_ssm.MB)}
    figures, series = bench_ssm.figures(sizes, max(50, plan.rtt // 2))
    results.add(figures)
    results.series["ssm"] = series


# ---------------------------------------------------------------------------- stage 2: data path under load

def data_path(plan: Plan, results: Results, progress: Callable[[str], None]) -> None:
    from bench import data_path as dp

    out = dp.run(dp.QUICK if plan.load == "quick" else dp.LoadPlan(), progress=progress)
    results.add(dp.figures(out))
    results.headline.update(dp.headline(out))
    results.series["data_path"] = out


# ---------------------------------------------------------------------------- stage 3: the daemon

def daemon_stages(plan: Plan, results: Results, root: Path, stage: Callable) -> None:
    from bench import daemon_bench as db

    vault = db.VaultRate(root / "vault-rate", plan.vault_seconds).start()
    with db.daemon_lab(root / "daemons", plan is QUICK) as lab:
        stage("click to first query", lambda: results.add(db.click_to_first_query(lab, plan.reps)))
        stage("bastion faults", lambda: results.add(db.bastion_faults(lab, plan.reps, plan.fault_transports)))
        stage("sysbench", lambda: _sysbench(db, lab, plan, results))
        stage("idle daemon", lambda: _idle(db, lab, plan, results))
    stage("Vault requests per hour", lambda: results.add(vault.figures(timeout=plan.vault_seconds + 240)))


def _sysbench(db: Any, lab: Any, plan: Plan, results: Results) -> None:
    figures, series = db.sysbench(lab, plan.sysbench_seconds, plan.sysbench_tables, plan.sysbench_rows)
    results.add(figures)
    results.series["sysbench_tps"] = series


def _idle(db: Any, lab: Any, plan: Plan, results: Results) -> None:
    figures, series = db.idle_costs(lab, plan.idle_counts, plan.idle_seconds)
    results.add(figures)
    results.series["rss"] = series


# ---------------------------------------------------------------------------- charts

def write_charts(results: Results, directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    made = []
    paths = results.series.get("paths") or {}
    if paths:
        names = list(dict.fromkeys(n for table in paths.values() for n in table))
        series = {f"{link}: download": [paths[link].get(n, {}).get("down MB/s") for n in names] for link in paths}
        made.append(report.bar_chart(directory / "throughput.png", "Bulk download through each path (MB/s, log scale)",
                                     [n.replace("dbtunneld ", "dbtunneld\n").replace("OpenSSH ", "OpenSSH\n")
                                      for n in names], series, "MB/s", log_scale=True))
    rss = results.series.get("rss")
    if rss:
        made.append(report.line_chart(directory / "rss_vs_tunnels.png", "Resident memory against open tunnels",
                                      rss["tunnels"], {k: v for k, v in rss.items() if k != "tunnels"}, "MiB",
                                      "open tunnels (dbtunneld: one daemon; OpenSSH: one ssh -L each)"))
    tps = results.series.get("sysbench_tps")
    if tps:
        made.append(report.bar_chart(directory / "sysbench.png", "sysbench oltp_read_only, transactions/s",
                                     list(tps), {"tps": list(tps.values())}, "tps"))
    return made


# ---------------------------------------------------------------------------- the run

def run(plan: Plan, quick: bool, only: str | None = None) -> Results:
    results = Results(meta=_meta(plan, quick))
    durations: dict[str, float] = {}

    def stage(name: str, fn: Callable[[], Any]) -> None:
        t0 = time.monotonic()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        try:
            fn()
        except Exception as exc:
            results.failures.append(f"{name}: {type(exc).__name__}: {exc}")
            traceback.print_exc(file=sys.stderr)
        durations[name] = round(time.monotonic() - t0, 1)

    root = Path(tempfile.mkdtemp(prefix="dbtunneld-bench-"))
    try:
        if only in (None, "paths"):
            stage("tunnel paths", lambda: tunnel_paths(plan, results, lambda what: print(
                f"  measured {what}", file=sys.stderr, flush=True)))
        if only in (None, "ssm"):
            stage("SSM data channel", lambda: ssm_channel(plan, results))
        if only in (None, "data-path"):
            stage("data path under load", lambda: data_path(plan, results, lambda what: print(
                what, file=sys.stderr, flush=True)))
        if only in (None, "daemon"):
            stage("daemon stages", lambda: daemon_stages(plan, results, root, stage))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    results.meta["stage_seconds"] = durations
    return results


def _meta(plan: Plan, quick: bool) -> dict[str, Any]:
    from dataclasses import asdict

    return {"started": time.strftime("%Y-%m-%d %H:%M:%S"), "quick": quick, "plan": asdict(plan),
            "cpus": os.cpu_count(), "load_average_at_start": os.getloadavg(), "python": platform.python_version(),
            "machine": platform.platform(), "delay_each_way_ms": 15}


def private_home() -> Path:
    """Point HOME and the AWS config at a private folder before botocore is imported: the
    benchmark never reads or writes the developer's ~/.aws (every daemon has its own HOME too)."""
    home = Path(tempfile.mkdtemp(prefix="dbtunneld-bench-home-"))
    for key in [k for k in os.environ if k.startswith(("AWS_", "VAULT_", "BAO_", "DBTUNNELD_"))]:
        del os.environ[key]
    os.environ.update(HOME=str(home), AWS_CONFIG_FILE=str(home / ".aws" / "config"),
                      AWS_SHARED_CREDENTIALS_FILE=str(home / ".aws" / "credentials"), AWS_EC2_METADATA_DISABLED="true")
    return home


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller transfers and shorter windows")
    parser.add_argument("--out", type=Path, default=report.RESULTS_DIR, help="where bench.json and the charts go")
    parser.add_argument("--only", choices=("paths", "ssm", "data-path", "daemon"), help="run one stage only")
    args = parser.parse_args(argv)
    plan = QUICK if args.quick else Plan()
    home = private_home()
    t0 = time.monotonic()
    try:
        results = run(plan, args.quick, args.only)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    results.meta["seconds"] = round(time.monotonic() - t0, 1)
    table = report.render_table(results)
    print(table)
    json_path = report.write_json(results, args.out)
    (args.out / "bench.txt").write_text(table + "\n")
    charts = []
    with contextlib.suppress(Exception):
        charts = write_charts(results, args.out)
    stages = ", ".join(f"{k} {v:.0f} s" for k, v in results.meta["stage_seconds"].items())
    print(f"\nrun took {results.meta['seconds']:.0f} s ({stages}) on {os.cpu_count()} CPUs (load at start "
          f"{results.meta['load_average_at_start'][0]:.1f}); wrote {json_path}, "
          f"{', '.join(p.name for p in charts) or 'no charts'} in {args.out}")
    return 0 if not results.failures else 1
