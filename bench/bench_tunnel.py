"""Tunnel benchmark: dbtunneld's tunnel beside direct TCP, OpenSSH ``ssh -L`` and sshtunnel.

One run, one table per link (loopback; a delay line adding 15 ms each way in front of the
bastion), every path measured the same way against a local data server (``ssm_testkit``):
bulk MB/s both ways, round-trip p50/p99 (64-byte echo), new-connection time to first byte,
the worst first byte when 20 connections open at once. Then the tunnel figures: set-up time,
reconnect time after the bastion returns, dead-tunnel detection time (bastion frozen), idle
CPU and wakeups per second with 10 open tunnels (each in its own process group). Ratios to
OpenSSH are printed with the targets of issue 5. Nothing is asserted: tests check behaviour,
this prints figures.

Paths: direct TCP; OpenSSH ``ssh -N -L`` (its defaults: chacha20-poly1305, 2 MB channel
window); sshtunnel 0.5 defaults (loopback only: it is the design card's package, measured to
show why the hot path uses paramiko directly); dbtunneld ``ssh`` mode; dbtunneld ``ssm-ssh``
through the SSM stand-in (the websocket goes through the delay line on the delayed link).
dbtunneld runs with its default settings (keepalive 5 s, health probe every 30 s).

Run: ``python -m bench.bench_tunnel [--mb 100] [--ssm-mb 20] [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import boto3

from bench.delayproxy import DelayProxy
from dbtunneld import ssh
from dbtunneld.config import TunnelSettings
from dbtunneld.model import TunnelState
from dbtunneld.sandbox.procs import free_port
from dbtunneld.sandbox.sshd import Bastion
from dbtunneld.sandbox.ssm_testkit import DataServer, StandInProcess, pattern
from dbtunneld.transport import SshTransport, SsmSshTransport, Transport
from dbtunneld.tunnel import Tunnel, probe_mysql

MB = 1_000_000
DELAY = 0.015
TARGET = "i-0be4c0ffee0123456"
PING = b"p" * 64
TIMEOUT = 120.0


# ---- the lab: servers on loopback -------------------------------------------------------------

@dataclass
class Lab:
    dir: Path
    data: DataServer
    mysql_port: int
    bastion: Bastion
    ssm: StandInProcess
    delayed_sshd: DelayProxy
    delayed_data: DelayProxy
    delayed_ssm: DelayProxy
    known_hosts: Path
    rewrite_stream_url: dict[str, str] = field(default_factory=dict)

    @property
    def sshd(self):
        return self.bastion.service


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    from dbtunneld.sandbox.stack import start_stack

    root = Path(tempfile.mkdtemp(prefix="dbtunneld-bench-tunnel-"))
    data = DataServer()
    closers: list[Callable[[], None]] = [data.close, lambda: shutil.rmtree(root, ignore_errors=True)]
    try:
        stack_cm = start_stack(vault=False, aws=False, sso=False, ssh=False, clusters=("orders",))
        stack = stack_cm.__enter__()
        closers.insert(0, lambda: stack_cm.__exit__(None, None, None))
        mysql_port = stack.clusters["orders"].port
        bastion = Bastion.create(root, free_port(), [("127.0.0.1", data.port), ("127.0.0.1", mysql_port)])
        bastion.service.start()
        closers.insert(0, bastion.service.kill)
        ssm = StandInProcess("--port", "0", "--target", f"{TARGET}=127.0.0.1:{bastion.port}",
                             "--allow-remote", "127.0.0.1", "--log-level", "WARNING",
                             log_path=str(root / "ssm-standin.log")).start()
        closers.insert(0, ssm.stop)
        ssm_port = int(ssm.url.rsplit(":", 1)[1])
        proxies = [DelayProxy(bastion.port, DELAY), DelayProxy(data.port, DELAY), DelayProxy(ssm_port, DELAY)]
        closers[:0] = [p.close for p in proxies]
        known_hosts = root / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{bastion.port} {bastion.host_key_line}\n"
                               f"[127.0.0.1]:{proxies[0].port} {bastion.host_key_line}\n")
        the_lab = Lab(root, data, mysql_port, bastion, ssm, *proxies, known_hosts)
        _route_stream_urls_through(the_lab)
        yield the_lab
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()


def _route_stream_urls_through(the_lab: Lab) -> None:
    """While ``rewrite_stream_url`` maps the stand-in's address to the delay line, the SSM
    websocket (the stream URL StartSession returns) goes through the delay line too."""
    from dbtunneld.ssm import api

    original = api._grant

    def grant(response: dict[str, Any]):
        url = response["StreamUrl"]
        for old, new in the_lab.rewrite_stream_url.items():
            url = url.replace(old, new)
        return original({**response, "StreamUrl": url})

    api._grant = grant


# ---- paths: each yields the local port a client connects to ------------------------------------

def settings() -> TunnelSettings:
    return TunnelSettings()          # the defaults users get


def mysql_probe(the_lab: Lab):
    """The health probe reads MariaDB's greeting (the data server sends none)."""
    return lambda transport, host, port, timeout: probe_mysql(transport, "127.0.0.1", the_lab.mysql_port, timeout)


def ssh_options(the_lab: Lab) -> Callable[[str], ssh.SshOptions]:
    b = the_lab.bastion
    return lambda label: ssh.SshOptions(user=b.user, host_label=label, key_file=str(b.client_key),
                                        use_agent=False, host_key=b.host_key_line)


def dbtunneld_ssh(the_lab: Lab, delayed: bool) -> Transport:
    port = the_lab.delayed_sshd.port if delayed else the_lab.bastion.port
    return SshTransport("127.0.0.1", port, ssh_options(the_lab))


def dbtunneld_ssm(the_lab: Lab, delayed: bool) -> Transport:
    ssm_url = the_lab.ssm.url
    if delayed:
        direct_netloc = ssm_url.split("//", 1)[1]
        ssm_url = f"http://127.0.0.1:{the_lab.delayed_ssm.port}"
        the_lab.rewrite_stream_url[direct_netloc] = f"127.0.0.1:{the_lab.delayed_ssm.port}"
    else:
        the_lab.rewrite_stream_url.clear()
    session = boto3.Session(aws_access_key_id="AKIDBENCH", aws_secret_access_key="bench-secret",
                            region_name="us-east-1")
    return SsmSshTransport(lambda: session, lambda: TARGET, ssh_options(the_lab), endpoint_url=ssm_url,
                           region="us-east-1")


@contextlib.contextmanager
def tunnel_path(the_lab: Lab, make: Callable[[Lab, bool], Transport], delayed: bool,
                remote_port: int | None = None) -> Iterator[int]:
    t = Tunnel("bench", 0, "127.0.0.1", remote_port or the_lab.data.port, make(the_lab, delayed), settings(),
               probe=mysql_probe(the_lab))
    t.start()
    try:
        wait_for(lambda: t.state == TunnelState.UP, 60, "tunnel up")
        yield t.local_port
    finally:
        t.stop()


@contextlib.contextmanager
def openssh_path(the_lab: Lab, delayed: bool, remote_port: int | None = None) -> Iterator[int]:
    proc, port = start_openssh(the_lab, delayed, remote_port or the_lab.data.port)
    try:
        wait_for(lambda: first_byte(port, 2) is not None, 30, "ssh -L ready")
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def start_openssh(the_lab: Lab, delayed: bool, remote_port: int) -> tuple[subprocess.Popen, int]:
    b = the_lab.bastion
    port = free_port()
    ssh_port = the_lab.delayed_sshd.port if delayed else b.port
    argv = ["ssh", "-F", "/dev/null", "-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={the_lab.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-i", str(b.client_key), "-p", str(ssh_port),
            "-L", f"127.0.0.1:{port}:127.0.0.1:{remote_port}", f"{b.user}@127.0.0.1"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    return proc, port


@contextlib.contextmanager
def sshtunnel_path(the_lab: Lab, delayed: bool) -> Iterator[int]:
    import sshtunnel

    b = the_lab.bastion
    fwd = sshtunnel.SSHTunnelForwarder(("127.0.0.1", the_lab.delayed_sshd.port if delayed else b.port),
                                       ssh_username=b.user, ssh_pkey=str(b.client_key), allow_agent=False,
                                       host_pkey_directories=[], remote_bind_address=("127.0.0.1", the_lab.data.port),
                                       local_bind_address=("127.0.0.1", 0))
    fwd.start()
    try:
        yield fwd.local_bind_port
    finally:
        fwd.stop()


@contextlib.contextmanager
def direct_path(the_lab: Lab, delayed: bool) -> Iterator[int]:
    yield the_lab.delayed_data.port if delayed else the_lab.data.port


PATHS: dict[str, Callable[[Lab, bool], contextlib.AbstractContextManager[int]]] = {
    "direct TCP": direct_path,
    "OpenSSH ssh -L": openssh_path,
    "sshtunnel": sshtunnel_path,
    "dbtunneld ssh": lambda lab_, d: tunnel_path(lab_, dbtunneld_ssh, d),
    "dbtunneld ssm-ssh": lambda lab_, d: tunnel_path(lab_, dbtunneld_ssm, d),
}


# ---- measurements on one path -----------------------------------------------------------------

def wait_for(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise TimeoutError(f"timed out waiting for {what}")


def connect(port: int, timeout: float = TIMEOUT) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def first_byte(port: int, timeout: float = 30.0) -> float | None:
    """Seconds from connect() to the first byte of an answer, or None."""
    start = time.perf_counter()
    try:
        with connect(port, timeout) as sock:
            sock.sendall(b"D 1 1\n")
            return time.perf_counter() - start if sock.recv(1) else None
    except OSError:
        return None


def download_mbps(port: int, n: int) -> float:
    with connect(port) as sock:
        start = time.perf_counter()
        sock.sendall(f"D {n} 3\n".encode())
        got = 0
        while got < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                raise EOFError(f"download ended after {got} bytes")
            got += len(chunk)
        return n / MB / (time.perf_counter() - start)


_UPLOAD = {}


def upload_mbps(port: int, n: int) -> float:
    data = _UPLOAD.get(n) or _UPLOAD.setdefault(n, pattern(n, 4))
    with connect(port) as sock:
        start = time.perf_counter()
        sock.sendall(f"U {n}\n".encode())
        sock.sendall(data)
        answer = b""
        while not answer.endswith(b"\n"):
            chunk = sock.recv(128)
            if not chunk:
                raise EOFError("no digest")
            answer += chunk
        return n / MB / (time.perf_counter() - start)


def round_trips_ms(port: int, count: int) -> tuple[float, float]:
    with connect(port) as sock:
        sock.sendall(b"E\n")
        times = []
        for _ in range(count + 5):
            start = time.perf_counter()
            sock.sendall(PING)
            got = 0
            while got < len(PING):
                got += len(sock.recv(len(PING) - got))
            times.append((time.perf_counter() - start) * 1000)
    times = sorted(times[5:])
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def new_connection_ms(port: int, count: int) -> float:
    times = [first_byte(port) for _ in range(count)]
    return statistics.median([t * 1000 for t in times if t is not None])


def burst_worst_ms(port: int, clients: int = 20) -> float:
    barrier = threading.Barrier(clients)
    results: list[float | None] = [None] * clients

    def one(i: int) -> None:
        barrier.wait()
        results[i] = first_byte(port)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(TIMEOUT)
    if any(r is None for r in results):
        return float("nan")
    return max(results) * 1000


def measure_path(port: int, n: int, rtts: int) -> dict[str, float]:
    p50, p99 = round_trips_ms(port, rtts)
    return {"down MB/s": download_mbps(port, n), "up MB/s": upload_mbps(port, n),
            "RTT p50 ms": p50, "RTT p99 ms": p99,
            "new conn p50 ms": new_connection_ms(port, max(10, rtts // 10)),
            "20-at-once worst first byte ms": burst_worst_ms(port)}


# ---- tunnel lifecycle figures -------------------------------------------------------------

def setup_seconds(start: Callable[[], Callable[[], None]], port_of: Callable[[], int], reps: int = 3) -> float:
    """Median seconds from starting a tunnel until a client's first byte through it."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        stop = start()
        try:
            wait_for(lambda: first_byte(port_of(), 5) is not None, 60, "first byte")
            times.append(time.perf_counter() - t0)
        finally:
            stop()
    return statistics.median(times)


def dbtunneld_setup(the_lab: Lab, make: Callable[[Lab, bool], Transport]) -> float:
    holder: dict[str, Tunnel] = {}

    def start():
        t = Tunnel("bench", 0, "127.0.0.1", the_lab.data.port, make(the_lab, False), settings(),
                   probe=mysql_probe(the_lab))
        t.start()
        holder["t"] = t
        return t.stop

    return setup_seconds(start, lambda: holder["t"].local_port)


def openssh_setup(the_lab: Lab) -> float:
    holder: dict[str, int] = {}

    def start():
        proc, port = start_openssh(the_lab, False, the_lab.data.port)
        holder["port"] = port
        return lambda: (proc.kill(), proc.wait(10))

    return setup_seconds(start, lambda: holder["port"])


def reconnect_and_detect(the_lab: Lab, make: Callable[[Lab, bool], Transport], reps: int) -> dict[str, float]:
    """Kill the bastion, bring it back: seconds until a waiting client's first byte. Freeze it:
    seconds until the tunnel reports it (default keepalive settings)."""
    t = Tunnel("bench", 0, "127.0.0.1", the_lab.data.port, make(the_lab, False), settings(),
               probe=mysql_probe(the_lab))
    t.start()
    reconnects, detections = [], []
    try:
        wait_for(lambda: t.state == TunnelState.UP, 60, "up")
        for _ in range(reps):
            the_lab.sshd.kill()
            wait_for(lambda: t.state != TunnelState.UP, 30, "loss noticed")
            time.sleep(1.0)
            the_lab.sshd.start()
            t0 = time.perf_counter()
            if first_byte(t.local_port, 30) is not None:
                reconnects.append(time.perf_counter() - t0)
            wait_for(lambda: t.state == TunnelState.UP, 30, "up again")
        for _ in range(max(1, reps - 1)):
            time.sleep(1.0)
            the_lab.sshd.freeze()
            t0 = time.perf_counter()
            try:
                wait_for(lambda: t.state != TunnelState.UP, 60, "freeze detected")
                detections.append(time.perf_counter() - t0)
            finally:
                the_lab.sshd.thaw()
            wait_for(lambda: t.state == TunnelState.UP, 60, "up after thaw")
    finally:
        t.stop()
    return {"reconnect s (median)": statistics.median(reconnects) if reconnects else float("nan"),
            "reconnect s (max)": max(reconnects, default=float("nan")),
            "detection s (median)": statistics.median(detections) if detections else float("nan"),
            "detection s (max)": max(detections, default=float("nan"))}


# ---- idle cost of 10 tunnels ---------------------------------------------------------------

def idle_child(kind: str, spec: dict[str, Any]) -> None:
    """Run in a child process: open 10 tunnels of ``kind``, say READY, idle until stdin closes."""
    opened: list[Any] = []
    if kind == "sshtunnel":
        import sshtunnel

        for _ in range(spec["count"]):
            fwd = sshtunnel.SSHTunnelForwarder(("127.0.0.1", spec["ssh_port"]), ssh_username=spec["user"],
                                               ssh_pkey=spec["key"], allow_agent=False, host_pkey_directories=[],
                                               remote_bind_address=("127.0.0.1", spec["mysql_port"]),
                                               local_bind_address=("127.0.0.1", 0))
            fwd.start()
            opened.append(fwd)
    else:
        for _ in range(spec["count"]):
            opts = lambda label: ssh.SshOptions(user=spec["user"], host_label=label, key_file=spec["key"],  # noqa: E731
                                                use_agent=False, host_key=spec["host_key"])
            if kind == "ssm-ssh":
                session = boto3.Session(aws_access_key_id="AKIDBENCH", aws_secret_access_key="x", region_name="us-east-1")
                transport: Transport = SsmSshTransport(lambda s=session: s, lambda: TARGET, opts,
                                                       endpoint_url=spec["ssm_url"], region="us-east-1")
            else:
                transport = SshTransport("127.0.0.1", spec["ssh_port"], opts)
            t = Tunnel(f"idle{len(opened)}", 0, "127.0.0.1", spec["mysql_port"], transport, TunnelSettings())
            t.start()
            opened.append(t)
        wait_for(lambda: all(t.state == TunnelState.UP for t in opened), 60, "10 tunnels up")
    print("READY", flush=True)
    sys.stdin.read()


def _proc_ticks_and_switches(pids: list[int]) -> tuple[float, int]:
    ticks, switches = 0.0, 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            ticks += int(fields[11]) + int(fields[12])
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(OSError):
                    for line in Path(f"/proc/{pid}/task/{task}/status").read_text().splitlines():
                        if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                            switches += int(line.split()[1])
    return ticks, switches


def idle_costs(the_lab: Lab, seconds: float, count: int = 10) -> dict[str, tuple[float, float]]:
    """CPU (% of one core) and wakeups/s of ``count`` idle tunnels per kind, over one window."""
    b = the_lab.bastion
    spec = {"count": count, "ssh_port": b.port, "user": b.user, "key": str(b.client_key),
            "host_key": b.host_key_line, "mysql_port": the_lab.mysql_port, "ssm_url": the_lab.ssm.url}
    groups: dict[str, list[subprocess.Popen]] = {}
    try:
        for kind in ("dbtunneld ssh", "dbtunneld ssm-ssh", "sshtunnel"):
            child = subprocess.Popen([sys.executable, "-m", "bench.bench_tunnel", "--idle-child",
                                      kind.replace("dbtunneld ", ""), json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, start_new_session=True)
            groups[kind] = [child]
            if child.stdout.readline().strip() != "READY":
                raise RuntimeError(f"idle child {kind} did not start")
        groups["OpenSSH ssh -L"] = [start_openssh(the_lab, False, the_lab.mysql_port)[0] for _ in range(count)]
        time.sleep(2.0)                     # let start-up work settle
        before = {k: _proc_ticks_and_switches([p.pid for p in ps]) for k, ps in groups.items()}
        time.sleep(seconds)
        after = {k: _proc_ticks_and_switches([p.pid for p in ps]) for k, ps in groups.items()}
    finally:
        for procs in groups.values():
            for p in procs:
                with contextlib.suppress(Exception):
                    p.kill()
                    p.wait(10)
    hz = os.sysconf("SC_CLK_TCK")
    return {k: (100.0 * (after[k][0] - before[k][0]) / hz / seconds, (after[k][1] - before[k][1]) / seconds)
            for k in groups}


# ---- the run ---------------------------------------------------------------------------------

LINKS = {"loopback": False, f"delayed ({DELAY * 1000:.0f} ms each way)": True}
METRICS = ("down MB/s", "up MB/s", "RTT p50 ms", "RTT p99 ms", "new conn p50 ms", "20-at-once worst first byte ms")
TARGETS = {"down MB/s": ("loopback >= 0.7x, delayed >= 3x OpenSSH", True),
           "up MB/s": ("loopback >= 0.7x, delayed >= 3x OpenSSH", True),
           "RTT p50 ms": ("<= 1.5x OpenSSH", False),
           "new conn p50 ms": ("<= 2 ms (loopback)", False),
           "20-at-once worst first byte ms": ("<= 100 ms", False)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    results: dict[str, Any] = {"links": {}, "lifecycle": {}, "idle": {}, "failures": []}
    with lab() as the_lab:
        for link, delayed in LINKS.items():
            table: dict[str, dict[str, float]] = {}
            for name, path in PATHS.items():
                if delayed and name == "sshtunnel":
                    continue
                n = (args.ssm_mb if "ssm" in name else args.mb) * MB
                rtts = args.rtt if not delayed else max(20, args.rtt // 5)
                try:
                    with path(the_lab, delayed) as port:
                        table[name] = measure_path(port, n, rtts)
                except Exception as exc:
                    results["failures"].append(f"{link} / {name}: {type(exc).__name__}: {exc}")
                print(f"  measured {link} / {name}", file=sys.stderr, flush=True)
            results["links"][link] = table
        results["lifecycle"] = lifecycle(the_lab, args)
        results["idle"] = idle_costs(the_lab, args.idle_seconds)
    return results


def lifecycle(the_lab: Lab, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    out["OpenSSH ssh -L"] = {"set-up s": openssh_setup(the_lab)}
    for name, make in (("dbtunneld ssh", dbtunneld_ssh), ("dbtunneld ssm-ssh", dbtunneld_ssm)):
        dbtunneld_ssm(the_lab, False) if "ssm" in name else None
        figures = {"set-up s": dbtunneld_setup(the_lab, make)}
        figures.update(reconnect_and_detect(the_lab, make, args.fault_reps))
        out[name] = figures
        print(f"  measured lifecycle / {name}", file=sys.stderr, flush=True)
    return out


def fmt(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    return f"{value:.0f}" if abs(value) >= 100 else f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}" \
        if abs(value) >= 1 else f"{value:.3f}"


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for link, table in results["links"].items():
        names = list(table)
        lines += ["", f"== {link} ==", "  " + "metric".ljust(32) + "".join(n.rjust(19) for n in names)
                  + "   dbtunneld ssh / OpenSSH   target"]
        ssh_ref = table.get("OpenSSH ssh -L", {})
        for metric in METRICS:
            row = "  " + metric.ljust(32) + "".join(fmt(table[n].get(metric)).rjust(19) for n in names)
            ours, ref = table.get("dbtunneld ssh", {}).get(metric), ssh_ref.get(metric)
            ratio = f"{ours / ref:.2f}x" if ours and ref else "-"
            lines.append(row + ratio.rjust(26) + "   " + TARGETS.get(metric, ("", True))[0])
    life = results["lifecycle"]
    names = list(life)
    lines += ["", "== tunnel lifecycle (loopback, default settings) ==",
              "  " + "metric".ljust(32) + "".join(n.rjust(19) for n in names) + "   target"]
    for metric in ("set-up s", "reconnect s (median)", "reconnect s (max)", "detection s (median)", "detection s (max)"):
        target = {"reconnect s (max)": "< 3 s", "reconnect s (median)": "< 3 s", "detection s (max)": "< 15 s",
                  "detection s (median)": "< 15 s"}.get(metric, "")
        lines.append("  " + metric.ljust(32) + "".join(fmt(life[n].get(metric)).rjust(19) for n in names)
                     + "   " + target)
    lines += ["  (OpenSSH ssh -L has no reconnect or dead-tunnel detection of its own: it exits.)", "",
              "== idle: 10 open tunnels ==", "  " + "".ljust(32) + "% of one core".rjust(16) + "wakeups/s".rjust(12)]
    for kind, (cpu, wakeups) in results["idle"].items():
        lines.append("  " + kind.ljust(32) + fmt(cpu).rjust(16) + fmt(wakeups).rjust(12))
    lines.append("  target: dbtunneld well under 1 % of a core")
    if results["failures"]:
        lines += ["", "not measured:"] + [f"  {f}" for f in results["failures"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="MB per bulk transfer (ssh paths)")
    parser.add_argument("--ssm-mb", type=int, default=20, help="MB per bulk transfer through SSM")
    parser.add_argument("--rtt", type=int, default=500, help="round trips on loopback (a fifth when delayed)")
    parser.add_argument("--fault-reps", type=int, default=3, help="bastion kills (and freezes - 1) per mode")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--idle-child", nargs=2, metavar=("KIND", "SPEC"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.idle_child:
        idle_child(args.idle_child[0], json.loads(args.idle_child[1]))
        return 0
    if args.quick:
        args.mb, args.ssm_mb, args.rtt, args.fault_reps, args.idle_seconds = 10, 2, 100, 1, 5.0
    started = time.monotonic()
    results = run(args)
    results["meta"] = {"seconds": round(time.monotonic() - started, 1), "cpus": os.cpu_count(),
                       "mb": args.mb, "ssm_mb": args.ssm_mb, "delay_each_way_ms": DELAY * 1000}
    print(render(results))
    print(f"\n(run took {results['meta']['seconds']:.0f} s on {os.cpu_count()} CPUs)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
