"""A reference for the data path bench: the least a relay hop can cost in Python.

``python -m bench.hop_relay LISTEN_PORT TARGET_PORT`` listens on 127.0.0.1:LISTEN_PORT and relays
every connection to 127.0.0.1:TARGET_PORT with one thread and one
``selectors`` loop: read what a side has (one buffer), write it to the other, stop reading a side
while its bytes wait; nothing else (no protocol, no counters, no locks). Put in front of OpenSSH
``ssh -L`` it shows what one more process on the path costs by itself, whatever runs in it
(``socat`` beside it is the same hop in C): the login = "local" tunnel has that hop (the daemon
speaks the MySQL login, then relays to the ssh master), the pass-through tunnel does not.
Runs until stdin closes.
"""

from __future__ import annotations

import selectors
import socket
import sys
import threading

R, W = selectors.EVENT_READ, selectors.EVENT_WRITE


class _Side:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.peer: _Side | None = None
        self.pending = b""          # read from the peer, not yet written to this side
        self.eof = False


def _send(sock: socket.socket, data: bytes | memoryview) -> int:
    try:
        return sock.send(data)
    except (BlockingIOError, InterruptedError):
        return 0


def serve(listen_port: int, target_port: int) -> None:
    sel = selectors.DefaultSelector()
    listener = socket.create_server(("127.0.0.1", listen_port), backlog=128)
    listener.setblocking(False)
    sel.register(listener, R, None)
    buffer = memoryview(bytearray(256 * 1024))

    def close(side: _Side) -> None:
        for s in (side, side.peer):
            if s is not None and s.sock.fileno() >= 0:
                watch(s, 0)
                s.sock.close()

    def watch(side: _Side, events: int) -> None:
        key = sel.get_map().get(side.sock)
        if key is None and events:
            sel.register(side.sock, events, side)
        elif key is not None and not events:
            sel.unregister(side.sock)
        elif key is not None and key.events != events:
            sel.modify(side.sock, events, side)

    while True:
        for key, mask in sel.select():
            if key.data is None:
                client, _ = listener.accept()
                upstream = socket.create_connection(("127.0.0.1", target_port))
                a, b = _Side(client), _Side(upstream)
                a.peer, b.peer = b, a
                for side in (a, b):
                    side.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    side.sock.setblocking(False)
                    watch(side, R)
                continue
            side: _Side = key.data
            peer = side.peer
            assert peer is not None
            try:
                if mask & W and side.pending:
                    side.pending = side.pending[_send(side.sock, side.pending):]
                if mask & R and not peer.pending:
                    n = side.sock.recv_into(buffer)
                    if n == 0:
                        side.eof = True
                        peer.sock.shutdown(socket.SHUT_WR)
                    else:
                        data = buffer[:n]
                        peer.pending = data[_send(peer.sock, data):].tobytes()
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                close(side)
                continue
            if side.eof and peer.eof:
                close(side)
                continue
            watch(side, (0 if side.eof or peer.pending else R) | (W if side.pending else 0))
            watch(peer, (0 if peer.eof or side.pending else R) | (W if peer.pending else 0))


def main() -> None:
    threading.Thread(target=serve, args=(int(sys.argv[1]), int(sys.argv[2])), daemon=True).start()
    sys.stdin.read()


if __name__ == "__main__":
    main()
