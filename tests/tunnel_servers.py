"""Real servers for the tunnel tests, on free loopback ports, stopped by pid.

A private sshd bastion (with kill / restart / freeze / thaw), a MySQL-greeting echo server
(speaks the first packet of the MySQL protocol, then echoes bytes: byte-exact bulk tests),
and a private MariaDB. Used until (and beside) the shared sandbox stack.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, deadline: float = 10.0, proc: subprocess.Popen | None = None) -> None:
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process {proc.args[0]} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {deadline}s")


def descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def signal_tree(pid: int, sig: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def keygen(path: Path, kind: str = "ed25519") -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", kind, "-N", "", "-f", str(path)], check=True)
    return path


class Sshd:
    """A forwarding-only OpenSSH bastion on a free port (its own host and client keys)."""

    def __init__(self, root: Path, permit_open: list[int], port: int | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.host_key = keygen(self.root / "host_ed25519")
        self.client_key = keygen(self.root / "client_ed25519")
        self.authorized = self.root / "authorized_keys"
        self.authorized.write_text((self.root / "client_ed25519.pub").read_text())
        self.permit_open = permit_open
        self.proc: subprocess.Popen | None = None
        self._write_config()

    @property
    def host_key_line(self) -> str:
        return " ".join(Path(str(self.host_key) + ".pub").read_text().split()[:2])

    def known_hosts_line(self) -> str:
        return f"[127.0.0.1]:{self.port} {self.host_key_line}\n"

    def _write_config(self) -> None:
        permit = " ".join(f"127.0.0.1:{p}" for p in self.permit_open) or "none"
        (self.root / "sshd_config").write_text(
            f"Port {self.port}\nListenAddress 127.0.0.1\nHostKey {self.host_key}\n"
            f"PidFile {self.root / 'sshd.pid'}\nAuthorizedKeysFile {self.authorized}\n"
            "PermitRootLogin prohibit-password\nUsePAM no\nPasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\nStrictModes no\nAllowTcpForwarding yes\n"
            f"PermitOpen {permit}\nPermitTTY no\nForceCommand /bin/false\nMaxStartups 200\n"
            "MaxSessions 200\nLogLevel ERROR\n")

    def start(self) -> "Sshd":
        os.makedirs("/run/sshd", exist_ok=True)
        log = open(self.root / "sshd.log", "ab")
        self.proc = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", str(self.root / "sshd_config")],
                                     stdout=log, stderr=log, start_new_session=True)
        log.close()
        wait_port(self.port, proc=self.proc)
        return self

    def kill(self) -> None:
        """The bastion dies: the listener and every connection it serves."""
        if self.proc and self.proc.poll() is None:
            signal_tree(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
        self.proc = None

    def restart(self) -> None:
        self.kill()
        self.start()

    def freeze(self) -> None:
        signal_tree(self.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        signal_tree(self.proc.pid, signal.SIGCONT)

    def stop(self) -> None:
        if self.proc:
            self.thaw()
        self.kill()


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
        self._stop = False
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
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

    def close(self) -> None:
        self._stop = True
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()


class MariaDB:
    """A private MariaDB instance (own datadir, socket and port)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> "MariaDB":
        data, sock = self.root / "data", self.root / "mysqld.sock"
        subprocess.run(["mariadb-install-db", "--no-defaults", f"--datadir={data}", "--user=root",
                        "--auth-root-authentication-method=socket", "--skip-test-db"],
                       check=True, capture_output=True)
        log = open(self.root / "mariadb.log", "ab")
        self.proc = subprocess.Popen(
            ["mariadbd", "--no-defaults", f"--datadir={data}", f"--socket={sock}", f"--port={self.port}",
             "--bind-address=127.0.0.1", "--user=root", "--skip-name-resolve",
             "--innodb-buffer-pool-size=32M", "--max-allowed-packet=256M",
             f"--pid-file={self.root / 'mariadb.pid'}"],
            stdout=log, stderr=log, start_new_session=True)
        log.close()
        wait_port(self.port, deadline=30, proc=self.proc)
        self.sql("CREATE USER 'app'@'%' IDENTIFIED BY 'app-secret-pw'; GRANT ALL ON *.* TO 'app'@'%';"
                 "CREATE DATABASE appdb;")
        return self

    def sql(self, statements: str) -> str:
        out = subprocess.run(["mariadb", "--no-defaults", f"--socket={self.root / 'mysqld.sock'}",
                              "-uroot", "-N", "-e", statements], check=True, capture_output=True, text=True)
        return out.stdout

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
