"""TLS on the local port (``local_tls = true``), for clients set to "require SSL".

A per-machine self-signed certificate for 127.0.0.1 / localhost, made with ``cryptography`` on
first use and kept in the state directory (key and certificate files 0600). The forwarding loop
relays plain sockets, so a TLS client is bridged: one thread copies between its TLS socket and one
end of a socket pair, and the loop gets the other end (``bridge``).
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import select
import socket
import ssl
import threading
from pathlib import Path

log = logging.getLogger(__name__)

CERT_NAME = "local-tls-cert.pem"
KEY_NAME = "local-tls-key.pem"
VALID_DAYS = 3650
READ_SIZE = 256 * 1024


def server_context(state_dir: Path) -> ssl.SSLContext:
    """The local port's TLS context; makes the certificate the first time."""
    cert, key = state_dir / CERT_NAME, state_dir / KEY_NAME
    if not (cert.exists() and key.exists()):
        _make_certificate(cert, key)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key))
    return ctx


def _make_certificate(cert_path: Path, key_path: Path) -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dbtunneld local port")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                                        x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    _write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
    _write_private(cert_path, cert.public_bytes(serialization.Encoding.PEM))
    log.info("made the local port's TLS certificate %s", cert_path)


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def bridge(tls: ssl.SSLSocket, label: str) -> socket.socket:
    """A plain socket whose bytes are the TLS connection's: the caller relays it like a client.
    One thread per bridged connection (an SSL object is not used from two threads)."""
    inner, outer = socket.socketpair()
    tls.settimeout(None)
    threading.Thread(target=_relay, args=(tls, inner), daemon=True, name=f"{label}-tls").start()
    return outer


def _relay(tls: ssl.SSLSocket, inner: socket.socket) -> None:
    """Copy both ways until either side ends; then close both."""
    other = {tls: inner, inner: tls}
    try:
        while True:
            ready = [tls] if tls.pending() else select.select([tls, inner], [], [])[0]
            for src in ready:
                data = src.recv(READ_SIZE)
                if not data:
                    return
                other[src].sendall(data)
    except (OSError, ValueError):
        pass
    finally:
        for s in (tls, inner):
            try:
                s.close()
            except OSError:
                pass
