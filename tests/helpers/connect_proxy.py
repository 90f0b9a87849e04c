"""A loopback HTTP CONNECT proxy for tests, optionally TLS-inspecting like a company proxy.

``ConnectProxy(route)``: ``route(host, port)`` says where a CONNECT to ``host:port`` really goes
(the proxy resolves names, not the client: a name only the proxy knows proves the client went
through it). With ``inspect`` (an ``ssl.SSLContext`` holding a certificate for the names), the
proxy answers the client's TLS itself and relays plain bytes to the route, as TLS-inspecting
proxies do; the client must then trust the proxy's CA. Every CONNECT is recorded in
``requests``; ``required_auth`` makes it answer 407 unless the client sends that header value.
Threads and sockets all end with ``close()``.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path
from typing import Callable


class ConnectProxy:
    def __init__(self, route: Callable[[str, int], tuple[str, int]], *, inspect: ssl.SSLContext | None = None,
                 required_auth: str = "") -> None:
        self.route = route
        self.inspect = inspect
        self.required_auth = required_auth
        self.requests: list[str] = []
        self.refused = 0
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = self._listener.getsockname()[1]
        self._sockets: list[socket.socket] = [self._listener]
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="connect-proxy", daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            self._keep(client)
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _keep(self, sock: socket.socket) -> None:
        with self._lock:
            self._sockets.append(sock)

    def _serve(self, client: socket.socket) -> None:
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = client.recv(4096)
                if not chunk:
                    return
                head += chunk
            lines = head.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
            method, authority, _ = lines[0].split(" ", 2)
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            if method != "CONNECT":
                client.sendall(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n")
                return
            if self.required_auth and headers.get("proxy-authorization") != self.required_auth:
                self.refused += 1
                client.sendall(b"HTTP/1.1 407 Proxy Authentication Required\r\ncontent-length: 0\r\n\r\n")
                return
            host, _, port = authority.rpartition(":")
            self.requests.append(authority)
            upstream = socket.create_connection(self.route(host.strip("[]"), int(port)), timeout=10)
            upstream.settimeout(None)
            self._keep(upstream)
            client.sendall(b"HTTP/1.1 200 Connection established\r\n\r\n")
            if self.inspect is not None:
                client = self.inspect.wrap_socket(client, server_side=True)
                self._keep(client)
            self._relay(client, upstream)
        except (OSError, ValueError, ssl.SSLError):
            pass
        finally:
            client.close()

    def _relay(self, a: socket.socket, b: socket.socket) -> None:
        def copy(src: socket.socket, dst: socket.socket) -> None:
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    dst.sendall(data)
            except OSError:
                pass
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

        other = threading.Thread(target=copy, args=(b, a), daemon=True)
        other.start()
        copy(a, b)
        other.join(10)
        b.close()

    def close(self) -> None:
        self._closed = True
        with self._lock:
            sockets, self._sockets = self._sockets, []
        for sock in sockets:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        self._thread.join(5)

    def __enter__(self) -> "ConnectProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def make_ca_and_cert(folder: Path, name: str) -> tuple[Path, Path, Path]:
    """(ca.pem, cert.pem, key.pem): a throwaway CA and a server certificate for ``name`` (openssl CLI)."""
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    ext = folder / "ext.cnf"
    ext.write_text(f"subjectAltName=DNS:{name}\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=dbtunneld test proxy CA", "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    return ca, cert, key
