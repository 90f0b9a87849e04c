"""A tap in front of Vault: a TCP proxy that notes the tokens crossing it and counts requests.

Used by the fault suite (the daemon's Vault tokens, for the secret scan: OpenBao refuses to
enable an audit device through its API) and the benchmarks (Vault requests seen from outside,
beside the daemon's own counter). Point a daemon's ``vault.address`` at ``VaultTap(url).address``.
"""

from __future__ import annotations

import re
import socket
import threading


class VaultTap:
    """A TCP proxy in front of Vault that notes every token crossing it and counts requests.

    OpenBao refuses to enable an audit device through its API, so the suite learns the Vault
    tokens a daemon was given here: ``X-Vault-Token`` request headers and ``client_token`` in
    login replies. Point a daemon's ``vault.address`` at ``address``.
    """

    TOKEN_HEADER = re.compile(rb"(?i)x-vault-token:[ \t]*([A-Za-z0-9._-]{16,})")
    CLIENT_TOKEN = re.compile(rb'"client_token"\s*:\s*"([^"]{16,})"')
    REQUEST_LINE = re.compile(rb"(?:GET|POST|PUT|DELETE|LIST|PATCH) /v1/\S* HTTP/1\.[01]\r\n")

    def __init__(self, upstream: str) -> None:
        from urllib.parse import urlsplit

        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.tokens: set[str] = set()
        self.requests = 0
        self._lock = threading.Lock()
        self._listener = socket.socket()
        self._listener.bind(("127.0.0.1", 0))
        self._listener.listen(64)
        self.address = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept_loop, name="vault-tap", daemon=True).start()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.upstream, timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        t = threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True)
        t.start()
        self._pump(upstream, client, False)
        t.join(30)

    def _pump(self, src: socket.socket, dst: socket.socket, to_vault: bool) -> None:
        buf, pos = b"", 0
        try:
            while data := src.recv(65536):
                dst.sendall(data)
                buf += data
                pos = self._scan(buf, pos, to_vault)
                if len(buf) > 1 << 16:
                    cut = max(0, pos - 256)
                    buf, pos = buf[cut:], pos - cut
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()

    def _scan(self, buf: bytes, pos: int, to_vault: bool) -> int:
        pattern = self.TOKEN_HEADER if to_vault else self.CLIENT_TOKEN
        with self._lock:
            self.tokens.update(m.group(1).decode() for m in pattern.finditer(buf, max(0, pos - 256)))
            if to_vault:
                matches = list(self.REQUEST_LINE.finditer(buf, pos))
                self.requests += len(matches)
                if matches:
                    return matches[-1].end()
        return pos if to_vault else max(pos, len(buf) - 256)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
