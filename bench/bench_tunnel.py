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

Each party runs in its own process, as in real use: the measuring client (this process), the
data server and delay lines (a child), each tunnel under test (a child: dbtunneld or sshtunnel;
OpenSSH is its own process anyway), sshd, MariaDB and the SSM stand-in (sandbox processes).
Children report their tunnels' state changes with CLOCK_MONOTONIC stamps, which are
comparable across processes on Linux, so detection times are measured from here.

Run: ``python -m bench.bench_tunnel [--mb 100] [--ssm-mb 20] [--quick] [--json PATH]``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
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

MB = 1_000_000
DELAY = 0.015
TARGET = "i-0be4c0ffee0123456"
PING = b"p" * 64
TIMEOUT = 120.0
SECRETS_ENV = "DBTUNNELD_BENCH_SECRETS"      # passwords for a child: its environment, never its argv


# ---- child processes -------------------------------------------------------------------------

class Child:
    """A child process of this module (``--child SPEC``): reads its stdout lines in a thread."""

    def __init__(self, spec: dict[str, Any], secrets: dict[str, str] | None = None) -> None:
        env = dict(os.environ, **({SECRETS_ENV: json.dumps(secrets)} if secrets else {}))
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.bench_tunnel", "--child", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, start_new_session=True, env=env)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.states: list[tuple[str, float]] = []          # (state, monotonic time)
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            words = line.split()
            if words and words[0] == "STATE":
                self.states.append((words[1], float(words[2])))
            else:
                self.lines.put(line.strip())

    def expect(self, word: str, timeout: float = 90.0) -> list[str]:
        end = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, end - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"child said nothing like {word!r} in {timeout:.0f} s") from None
            if line.split()[:1] == [word]:
                return line.split()[1:]
            if line.startswith("ERROR"):
                raise RuntimeError(line)

    def state(self) -> str:
        return self.states[-1][0] if self.states else ""

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def child_main(spec: dict[str, Any]) -> None:
    try:
        {"serve": serve_child, "tunnels": tunnels_child, "setup": setup_child}[spec["mode"]](spec)
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
        raise


def serve_child(spec: dict[str, Any]) -> None:
    """The data server and the delay lines (kept out of the measuring and tunnel processes)."""
    from bench.delayproxy import DelayProxy
    from dbtunneld.sandbox.ssm_testkit import DataServer

    data = DataServer()
    proxies = {name: DelayProxy(port, DELAY) for name, port in spec["delay"].items()}
    proxies["data"] = DelayProxy(data.port, DELAY)
    ports = {"data": data.port, **{f"delayed_{k}": v.port for k, v in proxies.items()}}
    print("READY " + json.dumps(ports), flush=True)
    sys.stdin.read()


def _transport(spec: dict[str, Any]):
    from dbtunneld.adapters import ssh
    from dbtunneld.adapters.transport import SshTransport, SsmSshTransport

    def opts(label: str) -> ssh.SshOptions:
        return ssh.SshOptions(user=spec["user"], host_label=label, key_file=spec["key"], use_agent=False,
                              host_key=spec["host_key"])

    if spec["kind"] == "ssm-ssh":
        import boto3

        session = boto3.Session(aws_access_key_id="AKIDBENCH", aws_secret_access_key="bench-secret",
                                region_name="us-east-1")
        return SsmSshTransport(lambda: session, lambda: TARGET, opts, endpoint_url=spec["ssm_url"],
                               region="us-east-1")
    if spec.get("client") in ("openssh", "auto"):      # an OpenSSH master moves the bytes
        from dbtunneld.adapters.openssh_transport import MasterSettings, OpenSshTransport
        from dbtunneld.adapters.ssh_auto import AutoSshTransport

        def openssh() -> OpenSshTransport:
            return OpenSshTransport(MasterSettings("127.0.0.1", spec["ssh_port"], spec["user"], key_file=spec["key"],
                                                   host_key=spec["host_key"],
                                                   keepalive_interval=spec.get("keepalive_interval", 5.0)))
        if spec["client"] == "auto":                   # the default: chosen by the round trip (ssh_auto)
            return AutoSshTransport("127.0.0.1", spec["ssh_port"], openssh,
                                    lambda: SshTransport("127.0.0.1", spec["ssh_port"], opts))
        return openssh()
    return SshTransport("127.0.0.1", spec["ssh_port"], opts)


def _rewrite_stream_urls(rewrite: dict[str, str]) -> None:
    """Send the SSM websocket (the stream URL StartSession returns) through the delay line."""
    from dbtunneld.adapters.ssm import api

    original = api._grant

    def grant(response: dict[str, Any]):
        url = response["StreamUrl"]
        for old, new in rewrite.items():
            url = url.replace(old, new)
        return original({**response, "StreamUrl": url})

    api._grant = grant


def _tunnel(spec: dict[str, Any], name: str, **shared: Any):
    from dbtunneld.core.config import TunnelSettings
    from dbtunneld.engine.tunnel import Tunnel
    from dbtunneld.engine.tunnel_health import probe_mysql

    def probe(transport, host, port, timeout):       # MariaDB answers the greeting probe
        return probe_mysql(transport, "127.0.0.1", spec["mysql_port"], timeout)

    def report(status) -> None:
        print(f"STATE {status.state.value} {time.monotonic():.6f} {name}", flush=True)

    settings = TunnelSettings(**{k: spec[k] for k in ("keepalive_interval",) if k in spec})
    return Tunnel(name, 0, "127.0.0.1", spec["remote_port"], _transport(spec), settings,
                  probe=probe, on_change=report, before_relay=_local_login(spec, name), **shared)


def _local_login(spec: dict[str, Any], name: str):
    """``spec["local_login"]`` = {user, lease_user} (their passwords ``password`` and
    ``lease_password`` in the child's environment, ``SECRETS_ENV``): the tunnel speaks the local
    login (``login = "local"``) as that local user, logging in upstream as that fixed "lease"."""
    if not spec.get("local_login"):
        return None
    login = {**spec["local_login"], **json.loads(os.environ.get(SECRETS_ENV, "{}"))}
    from dbtunneld.core.model import DbCredentials
    from dbtunneld.engine.local_login import LocalLogin

    lease = DbCredentials(login["lease_user"], login["lease_password"])
    return LocalLogin(name, login["user"], lambda: login["password"], lambda: lease)


def _shared_engine():
    """One engine loop and scheduler for every tunnel of the child, as in the daemon (so their
    keepalives share wake-ups); the caller stops the loop."""
    from dbtunneld.core.timing import SYSTEM_CLOCK
    from dbtunneld.engine.engine_loop import EngineLoop
    from dbtunneld.engine.scheduler import Scheduler

    engine = EngineLoop("dbtunneld-engine")
    engine.start()
    scheduler = Scheduler(SYSTEM_CLOCK)
    engine.submit(scheduler.drive(engine))
    return engine, scheduler


def _sshtunnel(spec: dict[str, Any]):
    import sshtunnel

    fwd = sshtunnel.SSHTunnelForwarder(("127.0.0.1", spec["ssh_port"]), ssh_username=spec["user"],
                                       ssh_pkey=spec["key"], allow_agent=False, host_pkey_directories=[],
                                       remote_bind_address=("127.0.0.1", spec["remote_port"]),
                                       local_bind_address=("127.0.0.1", 0))
    fwd.start()
    return fwd


def tunnels_child(spec: dict[str, Any]) -> None:
    """``count`` tunnels of ``kind``; prints READY with their ports, idles until stdin closes."""
    if spec.get("rewrite"):
        _rewrite_stream_urls(spec["rewrite"])
    if spec["kind"] == "sshtunnel":
        opened = [_sshtunnel(spec) for _ in range(spec["count"])]
        ports = [f.local_bind_port for f in opened]
    else:
        engine, scheduler = _shared_engine()
        opened = [_tunnel(spec, f"t{i}", engine=engine, scheduler=scheduler) for i in range(spec["count"])]
        for t in opened:
            t.start()
        try:
            wait_for(lambda: all(t.state.value == "up" for t in opened), 60, "tunnels up")
        except TimeoutError:
            raise TimeoutError("not up after 60 s: " + "; ".join(
                f"{t.name} {t.status().state.value} {t.status().last_error}" for t in opened
                if t.state.value != "up")) from None
        ports = [t.local_port for t in opened]
    print("READY " + " ".join(map(str, ports)), flush=True)
    sys.stdin.read()
    for t in opened:
        t.stop()
    if spec["kind"] != "sshtunnel":
        engine.stop()


def setup_child(spec: dict[str, Any]) -> None:
    """Seconds from Tunnel.start() until a client's first byte through it (``reps`` times)."""
    times = []
    for _ in range(spec["reps"]):
        t = _tunnel(spec, "setup")
        t0 = time.perf_counter()
        t.start()
        if first_byte(t.local_port, 60) is not None:
            times.append(time.perf_counter() - t0)
        t.stop()
    print("SETUP " + " ".join(f"{x:.6f}" for x in times), flush=True)


# ---- the lab: servers on loopback -------------------------------------------------------------

@dataclass
class Lab:
    dir: Path
    ports: dict[str, int]             # data, delayed_sshd, delayed_data, delayed_ssm
    mysql_port: int
    bastion: Any                      # sandbox Bastion (its .service has kill / freeze / thaw)
    ssm_url: str
    known_hosts: Path
    children: list[Child] = field(default_factory=list)

    @property
    def sshd(self):
        return self.bastion.service

    def spec(self, kind: str, delayed: bool = False, remote_port: int | None = None, **extra: Any) -> dict[str, Any]:
        b = self.bastion
        spec = {"mode": "tunnels", "kind": kind, "count": 1, "user": b.user, "key": str(b.client_key),
                "host_key": b.host_key_line, "mysql_port": self.mysql_port,
                "remote_port": remote_port or self.ports["data"],
                "ssh_port": self.ports["delayed_sshd"] if delayed else b.port, "ssm_url": self.ssm_url}
        if delayed and kind == "ssm-ssh":
            direct = self.ssm_url.split("//", 1)[1]
            spec["ssm_url"] = f"http://127.0.0.1:{self.ports['delayed_ssm']}"
            spec["rewrite"] = {direct: f"127.0.0.1:{self.ports['delayed_ssm']}"}
        spec.update(extra)
        return spec


@contextlib.contextmanager
def lab() -> Iterator[Lab]:
    from dbtunneld.sandbox.procs import free_port
    from dbtunneld.sandbox.sshd import Bastion
    from dbtunneld.sandbox.ssm_testkit import StandInProcess
    from dbtunneld.sandbox.stack import start_stack

    root = Path(tempfile.mkdtemp(prefix="dbtunneld-bench-tunnel-"))
    closers: list[Callable[[], None]] = [lambda: shutil.rmtree(root, ignore_errors=True)]
    try:
        stack_cm = start_stack(vault=False, aws=False, sso=False, ssh=False, clusters=("orders",))
        stack = stack_cm.__enter__()
        closers.insert(0, lambda: stack_cm.__exit__(None, None, None))
        mysql_port = stack.clusters["orders"].port
        sshd_port = free_port()
        ssm = StandInProcess("--port", "0", "--target", f"{TARGET}=127.0.0.1:{sshd_port}",
                             "--allow-remote", "127.0.0.1", "--log-level", "WARNING",
                             log_path=str(root / "ssm-standin.log"), credentials={"AKIDBENCH": "bench-secret"}).start()
        closers.insert(0, ssm.stop)
        servers = Child({"mode": "serve", "delay": {"sshd": sshd_port, "ssm": int(ssm.url.rsplit(":", 1)[1])}})
        closers.insert(0, servers.stop)
        ports = json.loads(" ".join(servers.expect("READY")))
        bastion = Bastion.create(root, sshd_port, [("127.0.0.1", ports["data"]), ("127.0.0.1", mysql_port)])
        bastion.service.start()
        closers.insert(0, bastion.service.kill)
        known_hosts = root / "known_hosts"
        known_hosts.write_text(f"[127.0.0.1]:{bastion.port} {bastion.host_key_line}\n"
                               f"[127.0.0.1]:{ports['delayed_sshd']} {bastion.host_key_line}\n")
        yield Lab(root, ports, mysql_port, bastion, ssm.url, known_hosts)
    finally:
        for close in closers:
            with contextlib.suppress(Exception):
                close()


# ---- paths: each yields the local port a client connects to ------------------------------------

@contextlib.contextmanager
def child_tunnel_path(the_lab: Lab, kind: str, delayed: bool, **extra: Any) -> Iterator[int]:
    child = Child(the_lab.spec(kind, delayed, **extra))
    try:
        yield int(child.expect("READY")[0])
    finally:
        child.stop()


@contextlib.contextmanager
def openssh_path(the_lab: Lab, delayed: bool, remote_port: int | None = None) -> Iterator[int]:
    proc, port = start_openssh(the_lab, delayed, remote_port or the_lab.ports["data"])
    try:
        wait_for(lambda: first_byte(port, 2) is not None, 30, "ssh -L ready")
        yield port
    finally:
        proc.kill()
        proc.wait(10)


def start_openssh(the_lab: Lab, delayed: bool, remote_port: int) -> tuple[subprocess.Popen, int]:
    from dbtunneld.sandbox.procs import free_port

    b = the_lab.bastion
    port = free_port()
    ssh_port = the_lab.ports["delayed_sshd"] if delayed else b.port
    argv = ["ssh", "-F", "/dev/null", "-N", "-o", "BatchMode=yes", "-o", "ExitOnForwardFailure=yes",
            "-o", "StrictHostKeyChecking=yes", "-o", f"UserKnownHostsFile={the_lab.known_hosts}",
            "-o", "GlobalKnownHostsFile=/dev/null", "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
            "-i", str(b.client_key), "-p", str(ssh_port),
            "-L", f"127.0.0.1:{port}:127.0.0.1:{remote_port}", f"{b.user}@127.0.0.1"]
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    return proc, port


@contextlib.contextmanager
def direct_path(the_lab: Lab, delayed: bool) -> Iterator[int]:
    yield the_lab.ports["delayed_data" if delayed else "data"]


PATHS: dict[str, Callable[[Lab, bool], contextlib.AbstractContextManager[int]]] = {
    "direct TCP": direct_path,
    "OpenSSH ssh -L": openssh_path,
    "sshtunnel": lambda lab_, d: child_tunnel_path(lab_, "sshtunnel", d),
    "dbtunneld ssh": lambda lab_, d: child_tunnel_path(lab_, "ssh", d),
    # the default where ssh is on PATH (bastion.client = "auto"): OpenSSH for a near bastion, paramiko for a far one
    "dbtunneld ssh, client auto": lambda lab_, d: child_tunnel_path(lab_, "ssh", d, client="auto"),
    "dbtunneld ssm-ssh": lambda lab_, d: child_tunnel_path(lab_, "ssm-ssh", d),
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


_UPLOAD: dict[int, bytes] = {}


def upload_mbps(port: int, n: int) -> float:
    from dbtunneld.sandbox.ssm_testkit import pattern

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
            "new conn p50 ms": new_connection_ms(port, max(20, rtts // 10)),
            "20-at-once worst first byte ms": burst_worst_ms(port)}


# ---- tunnel lifecycle figures -------------------------------------------------------------

def openssh_setup(the_lab: Lab, reps: int = 3) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        proc, port = start_openssh(the_lab, False, the_lab.ports["data"])
        try:
            wait_for(lambda: first_byte(port, 5) is not None, 60, "first byte")
            times.append(time.perf_counter() - t0)
        finally:
            proc.kill()
            proc.wait(10)
    return statistics.median(times)


def dbtunneld_setup(the_lab: Lab, kind: str, reps: int = 3) -> float:
    child = Child(the_lab.spec(kind, mode="setup", reps=reps))
    try:
        return statistics.median(float(x) for x in child.expect("SETUP"))
    finally:
        child.stop()


def _state_since(child: Child, t0: float, test: Callable[[str], bool]) -> float | None:
    for state, at in child.states:
        if at >= t0 and test(state):
            return at
    return None


def reconnect_and_detect(the_lab: Lab, kind: str, reps: int) -> dict[str, float]:
    """Kill the bastion, bring it back: seconds until a waiting client's first byte. Freeze it:
    seconds until the tunnel reports it (default keepalive settings)."""
    child = Child(the_lab.spec(kind))
    reconnects, detections = [], []
    try:
        port = int(child.expect("READY")[0])
        for _ in range(reps):
            t_kill = time.monotonic()
            the_lab.sshd.kill()
            wait_for(lambda: _state_since(child, t_kill, lambda s: s != "up"), 30, "loss noticed")
            time.sleep(1.0)
            the_lab.sshd.start()
            t0 = time.perf_counter()
            if first_byte(port, 30) is not None:
                reconnects.append(time.perf_counter() - t0)
            wait_for(lambda: child.state() == "up", 30, "up again")
        for _ in range(max(1, reps - 1)):
            time.sleep(1.0)
            t_freeze = time.monotonic()
            the_lab.sshd.freeze()
            try:
                at = wait_for(lambda: _state_since(child, t_freeze, lambda s: s != "up"), 60, "freeze detected")
                detections.append(at - t_freeze)
            finally:
                the_lab.sshd.thaw()
            wait_for(lambda: child.state() == "up", 60, "up after thaw")
    finally:
        child.stop()
    return {"reconnect s (median)": statistics.median(reconnects) if reconnects else float("nan"),
            "reconnect s (max)": max(reconnects, default=float("nan")),
            "detection s (median)": statistics.median(detections) if detections else float("nan"),
            "detection s (max)": max(detections, default=float("nan"))}


# ---- idle cost of 10 tunnels ---------------------------------------------------------------

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
    children: dict[str, Child] = {}
    groups: dict[str, list[int]] = {}
    openssh: list[subprocess.Popen] = []
    try:
        for name, kind in (("dbtunneld ssh", "ssh"), ("dbtunneld ssm-ssh", "ssm-ssh"), ("sshtunnel", "sshtunnel")):
            children[name] = Child(the_lab.spec(kind, count=count, remote_port=the_lab.mysql_port))
        for name, child in children.items():
            child.expect("READY")
            groups[name] = [child.proc.pid]
        openssh = [start_openssh(the_lab, False, the_lab.mysql_port)[0] for _ in range(count)]
        groups["OpenSSH ssh -L"] = [p.pid for p in openssh]
        time.sleep(2.0)                     # let start-up work settle
        before = {k: _proc_ticks_and_switches(v) for k, v in groups.items()}
        time.sleep(seconds)
        after = {k: _proc_ticks_and_switches(v) for k, v in groups.items()}
    finally:
        for child in children.values():
            child.stop()
        for p in openssh:
            p.kill()
            p.wait(10)
    hz = os.sysconf("SC_CLK_TCK")
    return {k: (100.0 * (after[k][0] - before[k][0]) / hz / seconds, (after[k][1] - before[k][1]) / seconds)
            for k in groups}


# ---- the run ---------------------------------------------------------------------------------

LINKS = {"loopback": False, f"delayed ({DELAY * 1000:.0f} ms each way)": True}
METRICS = ("down MB/s", "up MB/s", "RTT p50 ms", "RTT p99 ms", "new conn p50 ms", "20-at-once worst first byte ms")
TARGETS = {"down MB/s": "loopback >= 0.7x, delayed >= 3x",
           "up MB/s": "loopback >= 0.7x, delayed >= 3x",
           "RTT p50 ms": "<= 1.5x",
           "new conn p50 ms": "<= 2 ms (loopback)",
           "20-at-once worst first byte ms": "<= 100 ms"}


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
        for key, stage in (("lifecycle", lambda: lifecycle(the_lab, args)),
                           ("idle", lambda: idle_costs(the_lab, args.idle_seconds))):
            try:
                results[key] = stage()
            except Exception as exc:
                results["failures"].append(f"{key}: {type(exc).__name__}: {exc}")
    return results


def lifecycle(the_lab: Lab, args: argparse.Namespace) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {"OpenSSH ssh -L": {"set-up s": openssh_setup(the_lab)}}
    for name, kind in (("dbtunneld ssh", "ssh"), ("dbtunneld ssm-ssh", "ssm-ssh")):
        figures = {"set-up s": dbtunneld_setup(the_lab, kind)}
        figures.update(reconnect_and_detect(the_lab, kind, args.fault_reps))
        out[name] = figures
        print(f"  measured lifecycle / {name}", file=sys.stderr, flush=True)
    return out


def fmt(value: float | None) -> str:
    if value is None or value != value:
        return "-"
    if abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.2f}" if abs(value) >= 1 else f"{value:.3f}"


def _ratio(table: dict[str, dict[str, float]], name: str, metric: str) -> str:
    ours, ref = table.get(name, {}).get(metric), table.get("OpenSSH ssh -L", {}).get(metric)
    return f"{ours / ref:.2f}x" if ours and ref else "-"


def render(results: dict[str, Any]) -> str:
    lines: list[str] = []
    for link, table in results["links"].items():
        names = list(table)
        lines += ["", f"== {link} ==", "  " + "metric".ljust(31) + "".join(n.rjust(18) for n in names)
                  + "  ssh/OpenSSH  ssm/OpenSSH  target"]
        for metric in METRICS:
            row = "  " + metric.ljust(31) + "".join(fmt(table[n].get(metric)).rjust(18) for n in names)
            lines.append(row + _ratio(table, "dbtunneld ssh", metric).rjust(13)
                         + _ratio(table, "dbtunneld ssm-ssh", metric).rjust(13) + "  " + TARGETS.get(metric, ""))
    life = results["lifecycle"] or {}
    names = list(life)
    lines += ["", "== tunnel lifecycle (loopback, default settings) ==",
              "  " + "metric".ljust(31) + "".join(n.rjust(18) for n in names) + "  target"]
    targets = {"reconnect s (median)": "< 3 s", "reconnect s (max)": "< 3 s",
               "detection s (median)": "< 15 s", "detection s (max)": "< 15 s"}
    for metric in ("set-up s", *targets):
        lines.append("  " + metric.ljust(31) + "".join(fmt(life[n].get(metric)).rjust(18) for n in names)
                     + "  " + targets.get(metric, ""))
    lines += ["  (OpenSSH ssh -L neither reconnects nor detects a dead bastion by itself: it exits or hangs.)",
              "", "== idle: 10 open tunnels, one process per kind (OpenSSH: 10 processes) ==",
              "  " + "".ljust(31) + "% of one core".rjust(16) + "wakeups/s".rjust(12)]
    for kind, (cpu, wakeups) in results["idle"].items():
        lines.append("  " + kind.ljust(31) + fmt(cpu).rjust(16) + fmt(wakeups).rjust(12))
    lines.append("  target: dbtunneld well under 1 % of a core")
    if results["failures"]:
        lines += ["", "not measured:"] + [f"  {f}" for f in results["failures"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=100, help="MB per bulk transfer (ssh paths)")
    parser.add_argument("--ssm-mb", type=int, default=3, help="MB per bulk transfer through SSM (the stand-in runs realistic: ~0.5 MB/s down)")
    parser.add_argument("--rtt", type=int, default=500, help="round trips on loopback (a fifth when delayed)")
    parser.add_argument("--fault-reps", type=int, default=3, help="bastion kills (and freezes - 1) per mode")
    parser.add_argument("--idle-seconds", type=float, default=20.0)
    parser.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child_main(json.loads(args.child))
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
