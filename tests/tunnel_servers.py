"""Servers for the tunnel tests, on free loopback ports.

A private sshd bastion (the sandbox's harness, with our own PermitOpen list and its kill /
freeze / thaw), and a MySQL-greeting echo server (speaks the first packet of the MySQL
protocol, then echoes bytes: byte-exact tests through a tunnel whose health probe expects a
greeting; it counts the connections it has open), and a relay to a server whose answers can be
held (``HeldAnswers``).
"""

from __future__ import annotations

import socket
import struct
import subprocess
import threading
from pathlib import Path

from dbtunneld.sandbox.sshd import Bastion


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return path


class Sshd:
    """A private forwarding-only bastion: the sandbox's sshd harness with our PermitOpen list
    (e.g. an echo server beside MariaDB), and its fault methods (kill / freeze / thaw)."""

    def __init__(self, root: Path, permit_open: list[int], port: int | None = None) -> None:
        self.bastion = Bastion.create(Path(root), port or free_port(), [("127.0.0.1", p) for p in permit_open])
        self.service = self.bastion.service
        self.port = self.bastion.port

    @property
    def root(self) -> Path:
        return self.bastion.dir

    @property
    def host_key_line(self) -> str:
        return self.bastion.host_key_line

    @property
    def client_key(self) -> Path:
        return self.bastion.client_key

    @property
    def authorized(self) -> Path:
        return self.bastion.authorized_keys

    def reset_authorized_keys(self) -> None:
        self.authorized.write_text(self.bastion.client_public_key + "\n")

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key_line}\n"

    def is_running(self) -> bool:
        return self.service.is_running()

    def start(self) -> "Sshd":
        self.service.start()
        return self

    def kill(self) -> None:
        """The bastion dies: the listener and every connection it serves."""
        self.service.kill()

    def restart(self) -> None:
        self.kill()
        self.start()

    def freeze(self) -> None:
        self.service.freeze()

    def thaw(self) -> None:
        self.service.thaw()

    def stop(self) -> None:
        self.service.thaw()
        self.service.kill()


def mysql_greeting(version: bytes = b"5.7.0-fake") -> bytes:
    payload = b"\x0a" + version + b"\0" + struct.pack("<I", 1) + b"12345678\0" + b"\xff\xf7"
    payload += b"\x21\x02\x00\xff\x81\x15" + b"\0" * 10 + b"123456789012\0mysql_native_password\0"
    return struct.pack("<I", len(payload))[:3] + b"\0" + payload


def mysql_error(code: int, message: str) -> bytes:
    payload = b"\xff" + struct.pack("<H", code) + b"#HY000" + message.encode()
    return struct.pack("<I", len(payload))[:3] + b"\0" + payload


class GreetingEchoServer:
    """Speaks a MySQL greeting (or an error packet), then echoes every byte back."""

    def __init__(self, greeting: bytes | None = None) -> None:
        self.greeting = mysql_greeting() if greeting is None else greeting
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(256)
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.open_connections = 0         # accepted and not yet closed
        self._count_lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self._count_lock:
                self.accepted += 1
                self.open_connections += 1
            threading.Thread(target=self._echo, args=(conn,), daemon=True).start()

    def _echo(self, conn: socket.socket) -> None:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            conn.sendall(self.greeting)
            while data := conn.recv(262144):
                conn.sendall(data)
            conn.shutdown(socket.SHUT_WR)
        except OSError:
            pass
        finally:
            conn.close()
            with self._count_lock:
                self.open_connections -= 1

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class HeldAnswers:
    """The SSH connection through a relay whose server-to-client half can be held: the server's
    answers (a channel-open confirmation) arrive late, as over a congested SSM path."""

    def __init__(self, port: int) -> None:
        self._tcp = socket.create_connection(("127.0.0.1", port))
        self._ours, self.sock = socket.socketpair()
        self.flowing = threading.Event()
        self.flowing.set()
        self._threads = [threading.Thread(target=self._pipe, args=(self._ours, self._tcp, None), daemon=True),
                         threading.Thread(target=self._pipe, args=(self._tcp, self._ours, self.flowing), daemon=True)]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket, gate: threading.Event | None) -> None:
        try:
            while data := src.recv(65536):
                if gate is not None:
                    gate.wait()
                dst.sendall(data)
        except OSError:
            pass
        for sock in (src, dst):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.flowing.set()
        for sock in (self._tcp, self._ours, self.sock):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for thread in self._threads:
            thread.join(5)
        for sock in (self._tcp, self._ours, self.sock):
            sock.close()
