"""OpenSSH sshd as a forwarding-only bastion for the sandbox.

Generated ed25519 host and client keys, a ``known_hosts`` file for ``[127.0.0.1]:PORT``,
and a config that allows only public-key logins of the current user, TCP forwarding only to
the MariaDB ports (``PermitOpen``), no TTY and no shell (``ForceCommand /bin/false``).
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .procs import Service, banner_probe


def _sshd_binary() -> str:
    found = shutil.which("sshd") or ("/usr/sbin/sshd" if Path("/usr/sbin/sshd").exists() else None)
    if not found:
        raise FileNotFoundError("sshd not found; install openssh-server (./dev setup)")
    return found


def generate_key(path: Path, comment: str) -> str:
    """Create an ed25519 key pair at ``path`` (+ ``.pub``); return the public key line."""
    path.unlink(missing_ok=True)
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL, capture_output=True)
    return path.with_suffix(".pub").read_text().strip()


@dataclass
class Bastion:
    """The sshd bastion: ``port``, ``user``, key paths, ``host_key_line``, ``known_hosts``."""

    dir: Path
    port: int
    permit_open: list[tuple[str, int]]
    user: str = ""
    host_key_line: str = ""
    client_public_key: str = ""
    service: Service | None = None

    @property
    def host_key(self) -> Path:
        return self.dir / "ssh_host_ed25519_key"

    @property
    def client_key(self) -> Path:
        """The private key a client logs in with (no passphrase)."""
        return self.dir / "client_ed25519"

    @property
    def known_hosts(self) -> Path:
        return self.dir / "known_hosts"

    @property
    def authorized_keys(self) -> Path:
        return self.dir / "authorized_keys"

    @property
    def config_path(self) -> Path:
        return self.dir / "sshd_config"

    @classmethod
    def create(cls, base: Path, port: int, permit_open: list[tuple[str, int]]) -> "Bastion":
        b = cls(dir=base / "sshd", port=port, permit_open=list(permit_open),
                user="root" if os.geteuid() == 0 else getpass.getuser())
        b.service = Service(
            name="sshd", port=port, log_path=b.dir / "sshd.log",
            argv=[_sshd_binary(), "-D", "-e", "-f", str(b.config_path)],
            ready=banner_probe(port, b"SSH-"), before_start=lambda _svc: b.prepare(),
            start_timeout=10.0)
        return b

    def prepare(self) -> None:
        """Keys, known_hosts, authorized_keys and sshd_config (first start only)."""
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        if os.geteuid() == 0:
            Path("/run/sshd").mkdir(parents=True, exist_ok=True, mode=0o755)
        if not self.host_key.exists():
            self.host_key_line = " ".join(generate_key(self.host_key, "dbtunneld-sandbox-host").split()[:2])
            self.client_public_key = generate_key(self.client_key, "dbtunneld-sandbox-client")
            self.authorized_keys.write_text(self.client_public_key + "\n")
            self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {self.host_key_line}\n")
        self.config_path.write_text(self.config_text())

    def config_text(self) -> str:
        permit = " ".join(f"{h}:{p}" for h, p in self.permit_open) or "none"
        return "\n".join([
            f"ListenAddress 127.0.0.1:{self.port}",
            f"HostKey {self.host_key}",
            f"PidFile {self.dir / 'sshd.pid'}",
            f"AuthorizedKeysFile {self.authorized_keys}",
            f"AllowUsers {self.user}",
            "PermitRootLogin prohibit-password",
            "PubkeyAuthentication yes",
            "PasswordAuthentication no",
            "KbdInteractiveAuthentication no",
            "UsePAM no",
            "StrictModes no",
            "AllowTcpForwarding local",
            "AllowAgentForwarding no",
            "AllowStreamLocalForwarding no",
            "X11Forwarding no",
            "PermitTunnel no",
            "GatewayPorts no",
            f"PermitOpen {permit}",
            "PermitTTY no",
            "PermitUserRC no",
            "ForceCommand /bin/false",
            "ClientAliveInterval 15",
            "ClientAliveCountMax 3",
            "MaxStartups 100:30:200",
            "MaxSessions 100",
            "LogLevel INFO",
            "",
        ])

    def to_json(self) -> dict:
        return {"host": "127.0.0.1", "port": self.port, "user": self.user, "client_key": str(self.client_key),
                "known_hosts": str(self.known_hosts), "host_key": self.host_key_line,
                "permit_open": [f"{h}:{p}" for h, p in self.permit_open],
                "pid": self.service.pid if self.service else None}
