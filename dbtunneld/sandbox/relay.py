"""A stdio <-> TCP relay, usable as an SSH ProxyCommand to reach the sandbox's sshd.

    python -m dbtunneld.sandbox.relay HOST PORT

Copies stdin to the socket and the socket to stdout until either side closes; TCP_NODELAY
is set (without it every small SSH exchange waits ~40 ms for Nagle + delayed ACK).
"""

from __future__ import annotations

import os
import socket
import sys
import threading

CHUNK = 256 * 1024


def _stdin_to_socket(sock: socket.socket) -> None:
    fd = sys.stdin.fileno()
    try:
        while True:
            data = os.read(fd, CHUNK)
            if not data:
                break
            sock.sendall(data)
    except OSError:
        pass
    try:
        sock.shutdown(socket.SHUT_WR)
    except OSError:
        pass


def _socket_to_stdout(sock: socket.socket) -> None:
    fd = sys.stdout.fileno()
    try:
        while True:
            data = sock.recv(CHUNK)
            if not data:
                break
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
    except OSError:
        pass


def relay(host: str, port: int) -> int:
    """Relay until the server closes (or stdout breaks); returns the exit status."""
    try:
        sock = socket.create_connection((host, port), timeout=10)
    except OSError as exc:
        print(f"relay: cannot connect to {host}:{port}: {exc}", file=sys.stderr)
        return 1
    sock.settimeout(None)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    threading.Thread(target=_stdin_to_socket, args=(sock,), daemon=True).start()
    _socket_to_stdout(sock)
    sock.close()
    return 0


def command(host: str, port: int) -> list[str]:
    """The argv that runs this relay (e.g. for ``paramiko.ProxyCommand(shlex.join(...))``)."""
    return [sys.executable, "-m", "dbtunneld.sandbox.relay", host, str(port)]


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or not args[1].isdigit():
        print("usage: python -m dbtunneld.sandbox.relay HOST PORT", file=sys.stderr)
        return 2
    return relay(args[0], int(args[1]))


if __name__ == "__main__":
    sys.exit(main())
