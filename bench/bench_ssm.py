"""SSM data channel benchmark: direct TCP vs the native client vs session-manager-plugin.

One run, one table: download and upload MB/s and round-trip p50/p99 (64-byte echo) for

* direct TCP to the data server (the ceiling),
* the native client through the SSM stand-in (a separate process): an SSH-session stream
  (``AWS-StartSSHSession``, no smux) and a port-forward stream (smux), with AWS's 1 KiB
  messages in both directions, and the port-forward again with 16 KiB messages,
* AWS's session-manager-plugin through the same stand-in, when it is installed (it cannot be
  installed here from any package registry: the row then says so).

Run: ``python -m bench.bench_ssm [--mb 50] [--round-trips 500] [--json PATH]``.
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
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import boto3

from dbtunneld.errors import NeedsUserError
from dbtunneld.sandbox.ssm_testkit import DataServer, StandInProcess, download, pattern, pattern_digest
from dbtunneld.ssm import ChannelOptions, PluginProxy, find_plugin, start_port_forward, start_ssh_session

TARGET = "i-0123456789abcdef0"
MB = 1_000_000
PING = b"p" * 64


@dataclass
class Row:
    path: str
    down_mbps: float | None = None
    up_mbps: float | None = None
    rtt_p50_ms: float | None = None
    rtt_p99_ms: float | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def aws() -> boto3.Session:
    return boto3.Session(aws_access_key_id="AKIDBENCH", aws_secret_access_key="bench-secret", region_name="us-east-1")


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


def measure(path: str, open_stream: Callable[[], Any], n: int, round_trips: int) -> Row:
    row = Row(path)
    with open_stream() as sock:
        row.down_mbps = measure_download(sock, n)
    with open_stream() as sock:
        row.up_mbps = measure_upload(sock, n)
    with open_stream() as sock:
        row.rtt_p50_ms, row.rtt_p99_ms = measure_round_trips(sock, round_trips)
    return row


# --- the paths -------------------------------------------------------------------------------------


def direct(server: DataServer, n: int, round_trips: int) -> Row:
    def connect() -> socket.socket:
        sock = socket.create_connection(("127.0.0.1", server.port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    return measure("direct TCP", connect, n, round_trips)


def native_port_forward(url: str, server: DataServer, n: int, round_trips: int, payload: int) -> Row:
    options = ChannelOptions(max_payload=payload)
    with start_port_forward(aws(), TARGET, "127.0.0.1", server.port, endpoint_url=url, options=options) as session:
        row = measure(f"native port-forward (smux), {payload // 1024} KiB msgs", lambda: session.open_stream(), n, round_trips)
        row.extra = session.stats
    return row


class _SessionStream:
    """One SSH-session stream per measurement (the stream is the session)."""

    def __init__(self, url: str, payload: int) -> None:
        self.session = start_ssh_session(aws(), TARGET, endpoint_url=url, options=ChannelOptions(max_payload=payload))
        self.sock = self.session.sock

    def __enter__(self) -> socket.socket:
        return self.sock

    def __exit__(self, *exc: object) -> None:
        self.session.close()


def native_stream(url: str, n: int, round_trips: int, payload: int) -> Row:
    return measure(f"native SSH-session stream, {payload // 1024} KiB msgs", lambda: _SessionStream(url, payload), n, round_trips)


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


def plugin_row(url: str, n: int, round_trips: int) -> Row:
    try:
        binary = find_plugin()
    except NeedsUserError:
        return Row("session-manager-plugin", note="not installed: AWS ships it only as .deb/.rpm/.pkg downloads, no package registry has it; row skipped")
    row = measure("session-manager-plugin (AWS-StartSSHSession)", lambda: _PluginStream(url), n, round_trips)
    row.note = binary
    return row


# --- the run ---------------------------------------------------------------------------------------


def run(n: int, round_trips: int) -> list[Row]:
    server = DataServer()
    rows = [direct(server, n, round_trips)]
    log_path = os.path.join(tempfile.gettempdir(), f"bench-ssm-standin-{os.getpid()}.log")
    try:
        with StandInProcess("--target", f"{TARGET}=127.0.0.1:{server.port}", "--allow-remote", "127.0.0.1", "--allow-unsigned-websocket", "--log-level", "WARNING", log_path=log_path,
                            credentials={"AKIDBENCH": "bench-secret"}) as standin:
            rows.append(native_stream(standin.url, n, round_trips, 1024))
            rows.append(native_port_forward(standin.url, server, n, round_trips, 1024))
            standin.control("/_standin/faults", {"agent_payload": 16384})
            rows.append(native_port_forward(standin.url, server, n, round_trips, 16384))
            standin.control("/_standin/faults", {"agent_payload": 1024})
            rows.append(plugin_row(standin.url, n, round_trips))
    finally:
        server.close()
    return rows


def render(rows: list[Row], n: int) -> str:
    def num(value: float | None, digits: int = 1) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    header = ("path", "down MB/s", "up MB/s", "RTT p50 ms", "RTT p99 ms")
    lines = [header] + [(r.path, num(r.down_mbps), num(r.up_mbps), num(r.rtt_p50_ms, 2), num(r.rtt_p99_ms, 2)) for r in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    out = [f"SSM data channel, {n / MB:.0f} MB each way, loopback, stand-in as its own process"]
    for i, line in enumerate(lines):
        out.append("  ".join(cell.ljust(widths[0]) if j == 0 else cell.rjust(widths[j]) for j, cell in enumerate(line)))
        if i == 0:
            out.append("  ".join("-" * w for w in widths))
    out += [f"note: {r.path}: {r.note}" for r in rows if r.note]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.ERROR)
    parser = argparse.ArgumentParser(prog="python -m bench.bench_ssm", description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="bytes per transfer, in MB (default 50)")
    parser.add_argument("--round-trips", type=int, default=500)
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args(argv)
    n = int(args.mb * MB)
    rows = run(n, args.round_trips)
    print(render(rows, n))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
