"""SSM data channel benchmark: direct TCP vs the native client vs session-manager-plugin, per stand-in mode.

One run, one table per stand-in mode (``realistic``: the agent's 1 KiB reads with 1 ms sleeps and
oldest-only resends every 100 ms, as AWS runs it; ``fast``: the client's own ceiling):

* direct TCP to the data server (the ceiling, once),
* the native client through the SSM stand-in (its own process): a port-forward stream (smux,
  ``AWS-StartPortForwardingSessionToRemoteHost``) and an SSH-session stream
  (``AWS-StartSSHSession``), AWS's 1 KiB messages both ways: download / upload MB/s, round trip;
* AWS's session-manager-plugin through the same stand-in, when it is installed (it cannot be
  installed here from any package registry: the row then says so);
* recovery of a port-forward download: with 5 % of the messages lost each way (the longest
  stall, i.e. how long one loss holds the stream up, and the MB/s), and after the stand-in
  closes the websocket mid-transfer (the gap until bytes flow again: ResumeSession, a new
  websocket, the resends).

Run: ``python -m bench.bench_ssm [--realistic-mb 3] [--fast-mb 30] [--json PATH]``; also a stage of
``./dev bench`` (``python -m bench --only ssm``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import boto3

from dbtunneld.adapters.ssm import PluginProxy, find_plugin, start_port_forward, start_ssh_session
from dbtunneld.core.errors import NeedsUserError
from dbtunneld.sandbox.ssm_testkit import DataServer, StandInProcess, download, pattern, pattern_digest

TARGET = "i-0123456789abcdef0"
MB = 1_000_000
PING = b"p" * 64
KEY, SECRET = "AKIDBENCH", "bench-secret"
MODES = ("realistic", "fast")


@dataclass
class Row:
    mode: str
    path: str
    down_mbps: float | None = None
    up_mbps: float | None = None
    rtt_p50_ms: float | None = None
    rtt_p99_ms: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Recovery:
    mode: str
    loss_mbps: float | None = None          # download MB/s with 5 % loss each way
    loss_stall_s: float | None = None       # longest gap between arriving bytes under that loss
    close_gap_s: float | None = None        # websocket closed mid-download: gap until bytes flow again
    resumes: int = 0
    note: str = ""


def aws() -> boto3.Session:
    return boto3.Session(aws_access_key_id=KEY, aws_secret_access_key=SECRET, region_name="us-east-1")


# --- measurements on any connected stream --------------------------------------------------------


def measure_download(sock: Any, n: int) -> float:
    start = time.perf_counter()
    digest, got = download(sock, n, seed=7)
    elapsed = time.perf_counter() - start
    if got != n or digest != pattern_digest(n, seed=7):
        raise RuntimeError(f"download corrupted ({got} of {n} bytes)")
    return n / elapsed / MB


def measure_upload(sock: Any, n: int) -> float:
    data = pattern(n, seed=8)
    start = time.perf_counter()
    sock.sendall(f"U {n}\n".encode())
    sock.sendall(data)
    answer = b""
    while not answer.endswith(b"\n"):
        chunk = sock.recv(128)
        if not chunk:
            break
        answer += chunk
    elapsed = time.perf_counter() - start
    if answer.strip().decode() != pattern_digest(n, seed=8):
        raise RuntimeError("upload corrupted")
    return n / elapsed / MB


def measure_round_trips(sock: Any, count: int) -> tuple[float, float]:
    sock.sendall(b"E\n")
    times = []
    for _ in range(count):
        start = time.perf_counter()
        sock.sendall(PING)
        got = b""
        while len(got) < len(PING):
            chunk = sock.recv(4096)
            if not chunk:
                raise RuntimeError("echo closed")
            got += chunk
        times.append((time.perf_counter() - start) * 1000)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def measure(mode: str, path: str, open_stream: Callable[[], Any], n: int, round_trips: int) -> Row:
    row = Row(mode, path)
    with open_stream() as sock:
        row.down_mbps = measure_download(sock, n)
    with open_stream() as sock:
        row.up_mbps = measure_upload(sock, n)
    with open_stream() as sock:
        row.rtt_p50_ms, row.rtt_p99_ms = measure_round_trips(sock, round_trips)
    return row


def timed_download(sock: socket.socket, n: int) -> list[tuple[float, int]]:
    """Download ``n`` pattern bytes, checking them; (arrival time, bytes) of every read."""
    sock.sendall(f"D {n} 9\n".encode())
    arrivals, got, expected = [], 0, pattern(n, seed=9)
    buf = bytearray()
    while got < n:
        chunk = sock.recv(1 << 20)
        if not chunk:
            break
        arrivals.append((time.perf_counter(), len(chunk)))
        buf += chunk
        got += len(chunk)
    if bytes(buf) != expected:
        raise RuntimeError(f"download corrupted ({got} of {n} bytes)")
    return arrivals


def longest_gap(arrivals: list[tuple[float, int]], since: float = 0.0) -> float:
    times = [since] + [t for t, _ in arrivals if t >= since] if since else [t for t, _ in arrivals]
    return max((b - a for a, b in zip(times, times[1:])), default=0.0)


# --- the paths -------------------------------------------------------------------------------------


def direct(server: DataServer, n: int, round_trips: int) -> Row:
    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return measure("-", "direct TCP", connect, n, round_trips)


def native_port_forward(mode: str, url: str, server: DataServer, n: int, round_trips: int) -> Row:
    with start_port_forward(aws(), TARGET, "127.0.0.1", server.port, endpoint_url=url) as session:
        row = measure(mode, "native port-forward (smux), 1 KiB msgs", lambda: session.open_stream(), n, round_trips)
        row.extra = session.stats
    return row


class _SessionStream:
    """One SSH-session stream per measurement (the stream is the session)."""

    def __init__(self, url: str) -> None:
        self.session = start_ssh_session(aws(), TARGET, endpoint_url=url)
        self.sock = self.session.sock

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.session.close()


def native_stream(mode: str, url: str, n: int, round_trips: int) -> Row:
    return measure(mode, "native SSH-session stream, 1 KiB msgs", lambda: _SessionStream(url), n, round_trips)


class _PluginStream:
    """The plugin as a ProxyCommand: bytes through its stdin/stdout (after its banner line)."""

    def __init__(self, url: str) -> None:
        self.proxy = PluginProxy.start(aws(), TARGET, endpoint_url=url)
        self.proxy.settimeout(30)
        banner = b""
        while b"SessionId" not in banner or not banner.endswith(b"\n"):
            banner += self.proxy.recv(1)

    def sendall(self, data: bytes) -> None:
        self.proxy.send(data)

    def recv(self, size: int) -> bytes:
        return self.proxy.recv(size)

    def __enter__(self) -> "_PluginStream":
        return self

    def __exit__(self, *exc: object) -> None:
        self.proxy.close()


def plugin_row(mode: str, url: str, n: int, round_trips: int) -> Row:
    try:
        binary = find_plugin()
    except NeedsUserError:
        return Row(mode, "session-manager-plugin", note="not installed: AWS ships it only as .deb/.rpm/.pkg downloads, no package registry has it")
    row = measure(mode, "session-manager-plugin (AWS-StartSSHSession)", lambda: _PluginStream(url), n, round_trips)
    row.note = binary
    return row


# --- recovery --------------------------------------------------------------------------------------


def recovery(mode: str, standin: StandInProcess, server: DataServer, n: int) -> Recovery:
    result = Recovery(mode)
    with start_port_forward(aws(), TARGET, "127.0.0.1", server.port, endpoint_url=standin.url) as session:
        standin.control("/_standin/faults", {"drop": 0.05, "seed": 5})
        try:
            with session.open_stream(timeout=10) as sock:
                t0 = time.perf_counter()
                arrivals = timed_download(sock, n)
            result.loss_mbps = n / (arrivals[-1][0] - t0) / MB
            result.loss_stall_s = longest_gap(arrivals)
        finally:
            standin.control("/_standin/faults", {"drop": 0})
        result.close_gap_s = _close_gap(standin, session, n)
        result.resumes = int(session.stats.get("resumes", 0))
    if not result.resumes:
        result.note = "the websocket close did not lead to a resume"
    return result


def _close_gap(standin: StandInProcess, session: Any, n: int) -> float:
    """Close the websocket once a third of a download has arrived; the gap until bytes flow again."""
    closed_at: list[float] = []
    with session.open_stream(timeout=10) as sock:
        sock.sendall(f"D {n} 9\n".encode())
        arrivals, got = [], 0
        while got < n:
            chunk = sock.recv(1 << 20)
            if not chunk:
                break
            arrivals.append((time.perf_counter(), len(chunk)))
            got += len(chunk)
            if not closed_at and got >= n // 3:
                closed_at.append(time.perf_counter())
                threading.Thread(target=standin.control, args=(f"/_standin/sessions/{session.session_id}/close-websocket", {"mode": "close"}), daemon=True).start()
    if got != n:
        raise RuntimeError(f"download cut short after the websocket close ({got} of {n} bytes)")
    return longest_gap(arrivals, since=closed_at[0])


# --- the run ---------------------------------------------------------------------------------------


def run_mode(mode: str, server: DataServer, n: int, round_trips: int) -> tuple[list[Row], Recovery]:
    log_path = os.path.join(tempfile.gettempdir(), f"bench-ssm-standin-{mode}-{os.getpid()}.log")
    args = ("--target", f"{TARGET}=127.0.0.1:{server.port}", "--allow-remote", "127.0.0.1", "--mode", mode, "--log-level", "WARNING")
    with StandInProcess(*args, log_path=log_path, credentials={KEY: SECRET}) as standin:
        rows = [native_port_forward(mode, standin.url, server, n, round_trips),
                native_stream(mode, standin.url, n, round_trips),
                plugin_row(mode, standin.url, n, round_trips)]
        return rows, recovery(mode, standin, server, min(n, RECOVERY_BYTES.get(mode, n)))


RECOVERY_BYTES = {"realistic": 1 * MB}  # under 5 % loss the realistic agent moves ~0.1 MB/s


def run(sizes: dict[str, int], round_trips: int) -> tuple[list[Row], list[Recovery]]:
    server = DataServer()
    try:
        rows, recoveries = [direct(server, max(sizes.values()), round_trips)], []
        for mode, n in sizes.items():
            mode_rows, mode_recovery = run_mode(mode, server, n, round_trips)
            rows += mode_rows
            recoveries.append(mode_recovery)
    finally:
        server.close()
    return rows, recoveries


def render(rows: list[Row], recoveries: list[Recovery], sizes: dict[str, int]) -> str:
    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    sized = ", ".join(f"{m} {n / MB:g} MB" for m, n in sizes.items())
    header = ("mode", "path", "down MB/s", "up MB/s", "RTT p50 ms", "RTT p99 ms")
    lines = [header] + [(r.mode, r.path, num(r.down_mbps), num(r.up_mbps), num(r.rtt_p50_ms, 2), num(r.rtt_p99_ms, 2)) for r in rows]
    out = [f"SSM data channel on loopback, stand-in as its own process ({sized} each way)"] + _table(lines)
    out += [f"note: {r.mode} / {r.path}: {r.note}" for r in rows if r.note]
    rec = [("mode", "5% loss: down MB/s", "5% loss: longest stall s", "websocket close: gap s", "resumes")]
    rec += [(r.mode, num(r.loss_mbps, 2), num(r.loss_stall_s, 2), num(r.close_gap_s, 2), str(r.resumes)) for r in recoveries]
    out += ["", f"Recovery (native port-forward download; realistic mode {RECOVERY_BYTES['realistic'] / MB:g} MB)"] + _table(rec)
    out += [f"note: {r.mode}: {r.note}" for r in recoveries if r.note]
    return "\n".join(out)


def _table(lines: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(line[i]) for line in lines) for i in range(len(lines[0]))]
    out = []
    for i, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[j]) if j < 2 else cell.rjust(widths[j]) for j, cell in enumerate(line)))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    return out


def figures(sizes: dict[str, int], round_trips: int) -> tuple[list[Any], dict[str, Any]]:
    """For ``python -m bench``: one section per mode, the plugin as the reference, and the raw rows."""
    from bench.report import Figure

    rows, recoveries = run(sizes, round_trips)
    direct_row = rows[0]
    out = []
    for mode in sizes:
        section = f"SSM data channel, {mode} stand-in"
        plugin = next(r for r in rows if r.mode == mode and "plugin" in r.path)
        for r in (r for r in rows if r.mode == mode and "native" in r.path):
            for label, key, unit, higher, target in (("download", "down_mbps", "MB/s", True, ">= 1.0x plugin"),
                                                     ("upload", "up_mbps", "MB/s", True, ">= 1.0x plugin"),
                                                     ("round trip p50", "rtt_p50_ms", "ms", False, "")):
                out.append(Figure(section, label, r.path, getattr(r, key), unit, "session-manager-plugin",
                                  getattr(plugin, key), higher_is_better=higher, target=target))
        if plugin.down_mbps is None:
            out.append(Figure(section, "download", "session-manager-plugin", None, "MB/s", note=plugin.note))
        rec = next(x for x in recoveries if x.mode == mode)
        out += [Figure(section, "5 % loss: longest stall", "native port-forward", rec.loss_stall_s, "s", higher_is_better=False, target="< 1 s"),
                Figure(section, "5 % loss: download", "native port-forward", rec.loss_mbps, "MB/s"),
                Figure(section, "websocket closed: gap until data flows", "native port-forward", rec.close_gap_s, "s", higher_is_better=False, target="< 1 s")]
    out.append(Figure("SSM data channel", "download", "direct TCP (ceiling)", direct_row.down_mbps, "MB/s"))
    return out, {"rows": [asdict(r) for r in rows], "recovery": [asdict(r) for r in recoveries]}


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(prog="python -m bench.bench_ssm", description=__doc__.splitlines()[0])
    parser.add_argument("--realistic-mb", type=float, default=3.0, help="MB per transfer in realistic mode (~1 MB/s)")
    parser.add_argument("--fast-mb", type=float, default=30.0, help="MB per transfer in fast mode")
    parser.add_argument("--round-trips", type=int, default=200)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    sizes = {"realistic": int(args.realistic_mb * MB), "fast": int(args.fast_mb * MB)}
    rows, recoveries = run(sizes, args.round_trips)
    print(render(rows, recoveries, sizes))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": [asdict(r) for r in rows], "recovery": [asdict(r) for r in recoveries]}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
