"""The forwarding loop's own CPU per round trip (``adapters.forward``), without SSH or MySQL.

``python -m bench.forward_loop [--links 4] [--round-trips 20000] [--no-watch] [--source DIR]``

An echo server and a ping-pong load generator run as their own processes; this process holds one
``Forwarder`` relaying each load connection to the echo server over a ``SocketUpstream`` (the
shape of the local login's relay to the ssh master), with the local login's ``CommandWatch`` on the
upload unless ``--no-watch``. Each round trip is one 64-byte MySQL-framed command packet and its
echo: two loop events. Printed: round trips/s and the loop thread's CPU per round trip
(``/proc/self/task/TID/stat``). ``--source DIR`` measures the dbtunneld of another checkout (old vs
new on the same machine: run both, one after the other).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time

ECHO = r"""
import selectors, socket
listener = socket.create_server(("127.0.0.1", 0))
print(listener.getsockname()[1], flush=True)
sel = selectors.DefaultSelector()
sel.register(listener, selectors.EVENT_READ)
while True:
    for key, _ in sel.select():
        if key.fileobj is listener:
            conn, _ = listener.accept()
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sel.register(conn, selectors.EVENT_READ)
            continue
        data = key.fileobj.recv(65536)
        if data:
            key.fileobj.sendall(data)
        else:
            sel.unregister(key.fileobj)
            key.fileobj.close()
"""

LOAD = r"""
import socket, sys, threading, time
port, rounds, links = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
packet = (60).to_bytes(3, "little") + b"\x00" + b"\x03" + b"q" * 59     # COM_QUERY, sequence 0

def run():
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    for _ in range(rounds):
        sock.sendall(packet)
        got = 0
        while got < len(packet):
            got += len(sock.recv(65536))
    sock.close()

threads = [threading.Thread(target=run) for _ in range(links)]
started = time.perf_counter()
for t in threads:
    t.start()
for t in threads:
    t.join()
print(time.perf_counter() - started)
"""


def thread_cpu(tid: int) -> float:
    fields = open(f"/proc/self/task/{tid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.forward_loop", description=__doc__.splitlines()[0])
    ap.add_argument("--links", type=int, default=4)
    ap.add_argument("--round-trips", type=int, default=20000, help="per link")
    ap.add_argument("--no-watch", action="store_true", help="no CommandWatch on the upload")
    ap.add_argument("--source", help="import dbtunneld from this checkout")
    args = ap.parse_args()
    if args.source:
        sys.path.insert(0, args.source)
    from dbtunneld.adapters.command_watch import CommandWatch
    from dbtunneld.adapters.forward import Forwarder
    from dbtunneld.adapters.forward_upstream import SocketUpstream

    echo = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    try:
        echo_port = int(echo.stdout.readline())       # type: ignore[union-attr]
        loop_tid: dict[str, int] = {}
        forwarder = Forwarder("forward-loop-bench", on_start=lambda: loop_tid.setdefault("tid", threading.get_native_id()))
        forwarder.start()
        listener = socket.create_server(("127.0.0.1", 0))

        def accept() -> None:
            while True:
                try:
                    client, _ = listener.accept()
                except OSError:
                    return
                upstream = socket.create_connection(("127.0.0.1", echo_port))
                for s in (client, upstream):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                watch = None if args.no_watch else CommandWatch(0x11, lambda c, u, held: b"")
                forwarder.add(client, SocketUpstream(upstream), lambda link: None, "bench", commands=watch)

        threading.Thread(target=accept, daemon=True).start()
        while "tid" not in loop_tid:
            time.sleep(0.01)
        before = thread_cpu(loop_tid["tid"])
        out = subprocess.run([sys.executable, "-c", LOAD, str(listener.getsockname()[1]), str(args.round_trips),
                              str(args.links)], capture_output=True, text=True, check=True).stdout
        cpu = thread_cpu(loop_tid["tid"]) - before
        total = args.round_trips * args.links
        print(f"{args.links} links x {args.round_trips} round trips ({'no watch' if args.no_watch else 'command watch'}): "
              f"{total / float(out):,.0f} round trips/s, forwarding loop CPU {cpu * 1e6 / total:.1f} us per round trip")
        listener.close()
        forwarder.close()
    finally:
        echo.kill()
        echo.wait(10)


if __name__ == "__main__":
    main()
