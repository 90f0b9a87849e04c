"""How the data-channel websocket reaches AWS: directly or through an HTTP proxy, and whose CAs it trusts.

Proxies, as AWS's session-manager-plugin chooses them: it dials with gorilla/websocket's
``DefaultDialer`` (src/websocketutil/websocketutil.go ``NewWebsocketUtil``), whose ``Proxy`` is
Go's ``http.ProxyFromEnvironment``: ``wss://`` URLs use ``HTTPS_PROXY`` / ``https_proxy``,
``ws://`` ones ``HTTP_PROXY`` / ``http_proxy``; ``NO_PROXY`` / ``no_proxy`` (host names, domain
suffixes, ``*``) bypass it; ``localhost`` and loopback addresses are never proxied. The proxy
is always asked with ``CONNECT host:port`` (gorilla's proxy dialer), with Basic
``Proxy-Authorization`` when the proxy URL carries a user.

CA bundle, as boto3 chooses it: ``AWS_CA_BUNDLE`` or the profile's ``ca_bundle`` (botocore's
``ca_bundle`` config variable) replaces the default trust store; without it the system's
(which honours ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``, as Go does) is used. A company's
TLS-inspecting proxy needs its CA here.

Proxy credentials are secrets: the proxy is only ever logged as ``host:port``.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import logging
import os
import socket
import ssl
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..tls import client_ssl_context

if TYPE_CHECKING:
    from ...core.errors import DbtunneldError

log = logging.getLogger(__name__)

MAX_PROXY_REPLY = 16 * 1024


class ProxyError(ConnectionError):
    """The proxy refused the CONNECT or answered something else."""


@dataclass(frozen=True)
class Proxy:
    host: str
    port: int
    authorization: str = field(default="", repr=False)

    @property
    def label(self) -> str:
        return f"{self.host}:{self.port}"


def proxy_for(url: str, environ: dict[str, str] | None = None) -> Proxy | None:
    """The proxy for a ``ws://`` / ``wss://`` URL under the environment's rules, or None (direct)."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"wss": "https", "ws": "http"}.get(parts.scheme, parts.scheme)
    host = parts.hostname or ""
    if _is_loopback(host):
        return None
    proxies = _environment_proxies(os.environ if environ is None else environ)
    chosen = proxies.get(scheme)
    if not chosen or _bypassed(host, parts.port, proxies):
        return None
    return parse_proxy(chosen)


def parse_proxy(text: str) -> Proxy:
    """``http://[user:password@]host[:port]`` (a bare ``host:port`` means http)."""
    parsed = urllib.parse.urlsplit(text if "://" in text else f"http://{text}")
    if parsed.scheme not in ("http", "") or not parsed.hostname:
        raise ValueError(f"proxy {parsed.hostname or text.split('@')[-1]!r}: only http:// proxies are supported")
    auth = ""
    if parsed.username is not None:
        user = urllib.parse.unquote(parsed.username)
        password = urllib.parse.unquote(parsed.password or "")
        auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return Proxy(parsed.hostname, parsed.port or 80, auth)


def _environment_proxies(environ: Mapping[str, str]) -> dict[str, str]:
    """Like urllib's ``getproxies_environment``, on a given mapping (lowercase names win)."""
    found: dict[str, str] = {}
    for name, value in environ.items():
        lower = name.lower()
        if value and lower.endswith("_proxy") and (lower == name or lower not in environ):
            found[lower[:-6]] = value
    return found


def _bypassed(host: str, port: int | None, proxies: dict[str, str]) -> bool:
    if "no" not in proxies:
        return False
    target = f"{host}:{port}" if port else host
    return bool(urllib.request.proxy_bypass_environment(target, proxies))  # type: ignore[attr-defined]  # not in typeshed


def _is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def tls_context(ca_bundle: str | None) -> ssl.SSLContext:
    """One trusting only ``ca_bundle`` (as botocore does with verify=path), else the client
    context of ``tls.client_ssl_context`` (the OS trust store when Python's OpenSSL has no CAs)."""
    if ca_bundle:
        if not os.path.isfile(ca_bundle):
            raise FileNotFoundError(f"CA bundle {ca_bundle} (AWS_CA_BUNDLE / ca_bundle) does not exist")
        return client_ssl_context({"AWS_CA_BUNDLE": ca_bundle})
    return client_ssl_context()


async def open_tunnel(proxy: Proxy, host: str, port: int, timeout: float) -> socket.socket:
    """A connected non-blocking socket to ``host:port`` through ``proxy`` (HTTP CONNECT)."""
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(proxy.host, proxy.port, type=socket.SOCK_STREAM)
    last: OSError | None = None
    for family, kind, proto, _name, address in infos:
        sock = socket.socket(family, kind, proto)
        sock.setblocking(False)
        try:
            await asyncio.wait_for(loop.sock_connect(sock, address), timeout)
            await _connect_request(loop, sock, proxy, host, port)
            return sock
        except (OSError, asyncio.TimeoutError) as exc:
            sock.close()
            last = exc if isinstance(exc, OSError) else OSError(f"proxy {proxy.label} timed out")
            if isinstance(exc, ProxyError):
                raise
    raise last or OSError(f"proxy {proxy.label}: no address")


async def _connect_request(loop: asyncio.AbstractEventLoop, sock: socket.socket, proxy: Proxy, host: str, port: int) -> None:
    authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [f"CONNECT {authority} HTTP/1.1", f"Host: {authority}"]
    if proxy.authorization:
        lines.append(f"Proxy-Authorization: {proxy.authorization}")
    await loop.sock_sendall(sock, ("\r\n".join(lines) + "\r\n\r\n").encode())
    reply = b""
    while b"\r\n\r\n" not in reply:   # the tunnel carries nothing until we speak: no over-read
        chunk = await loop.sock_recv(sock, 1024)
        if not chunk:
            raise ProxyError(f"proxy {proxy.label} closed the connection during CONNECT {authority}")
        reply += chunk
        if len(reply) > MAX_PROXY_REPLY:
            raise ProxyError(f"proxy {proxy.label}: oversized reply to CONNECT")
    status_line = reply.split(b"\r\n", 1)[0].decode("latin-1")
    fields = status_line.split(" ", 2)
    if len(fields) < 2 or fields[1] != "200":
        raise ProxyError(f"proxy {proxy.label} refused CONNECT {authority}: {status_line[:120]}")
    log.debug("websocket tunnelled through proxy %s to %s", proxy.label, authority)


def dial_error(exc: BaseException, what: str) -> "DbtunneldError | None":
    """A websocket dial failure that needs the user (trust store, proxy), or None (transient)."""
    from ...core.errors import NeedsUserError

    if isinstance(exc, ssl.SSLCertVerificationError):
        return NeedsUserError(f"{what}: TLS certificate not trusted ({exc.verify_message})",
                              hint="behind a TLS-inspecting proxy set AWS_CA_BUNDLE (or ca_bundle in the AWS profile) to its CA bundle")
    if isinstance(exc, FileNotFoundError):
        return NeedsUserError(f"{what}: {exc}", hint="fix AWS_CA_BUNDLE / ca_bundle in the AWS profile")
    if isinstance(exc, ValueError) and "proxy" in str(exc):
        return NeedsUserError(f"{what}: {exc}", hint="set HTTPS_PROXY to http://host:port")
    return None
