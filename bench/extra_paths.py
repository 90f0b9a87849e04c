"""Paths the tunnel benchmark lacks, measured in its lab: dbtunneld's tunnel in ``ssm-port-forward``
mode (an SSM port session through the stand-in, one smux stream per client, no SSH).

``port_forward_path(lab, delayed)`` is a context manager like ``bench_tunnel.PATHS`` entries: it
runs the tunnel in its own process (``python -m bench.extra_paths --child SPEC``) and yields the
local port. The remote is the lab's data server; since a port session reaches only its one
host:port, the tunnel's MySQL greeting probe is replaced by a no-op here (the benchmark measures
bytes, not health).
"""

from __future__ import annotations

import contextlib
import json
import queue
import subprocess
import sys
import threading
from typing import Any, Iterator

from bench import bench_tunnel as bt


class PortForwardChild(bt.Child):
    """``bench_tunnel.Child`` running this module's child instead."""

    def __init__(self, spec: dict[str, Any]) -> None:            # noqa: D107 - same as the parent's
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.extra_paths", "--child", json.dumps(spec)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                     text=True, start_new_session=True)
        self.lines: "queue.Queue[str]" = queue.Queue()
        self.states: list[tuple[str, float]] = []
        threading.Thread(target=self._read, daemon=True).start()


def spec_for(lab: "bt.Lab", delayed: bool) -> dict[str, Any]:
    spec = lab.spec("ssm-ssh", delayed)            # the SSM URL (and its delay-line rewrite)
    spec["kind"] = "ssm-port-forward"
    return spec


@contextlib.contextmanager
def port_forward_path(lab: "bt.Lab", delayed: bool) -> Iterator[int]:
    child = PortForwardChild(spec_for(lab, delayed))
    try:
        yield int(child.expect("READY")[0])
    finally:
        child.stop()


def _tunnel(spec: dict[str, Any]):
    import boto3

    from dbtunneld.adapters.mysqlwire import ProbeResult
    from dbtunneld.adapters.transport import SsmPortForwardTransport
    from dbtunneld.engine.tunnel import Tunnel

    session = boto3.Session(aws_access_key_id="AKIDBENCH", aws_secret_access_key="bench-secret",
                            region_name="us-east-1")
    transport = SsmPortForwardTransport(lambda: session, lambda: bt.TARGET, "127.0.0.1", spec["remote_port"],
                                        endpoint_url=spec["ssm_url"], region="us-east-1")
    return Tunnel("pf", 0, "127.0.0.1", spec["remote_port"], transport,
                  probe=lambda *_args: ProbeResult(True, "bench: no probe"))


def child_main(spec: dict[str, Any]) -> None:
    if spec.get("rewrite"):
        bt._rewrite_stream_urls(spec["rewrite"])
    tunnel = _tunnel(spec)
    tunnel.start()
    bt.wait_for(lambda: tunnel.state.value == "up", 90, "port-forward tunnel up")
    print(f"READY {tunnel.local_port}", flush=True)
    sys.stdin.read()
    tunnel.stop()


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        try:
            child_main(json.loads(sys.argv[2]))
        except Exception as exc:
            print(f"ERROR {type(exc).__name__}: {exc}", flush=True)
            raise
