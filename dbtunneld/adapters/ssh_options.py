"""What an SSH connection to the bastion is made with: who logs in, how the server is checked,
and the transport tuning (see STACK-NOTES, "SSH forwarding speed")."""

from __future__ import annotations

from dataclasses import dataclass

import paramiko

WINDOW_SIZE = 16 * 1024 * 1024
MAX_PACKET = 256 * 1024
SSH_PORT = 22


@dataclass(frozen=True)
class SshOptions:
    """Who to log in as, how to check the server, and the transport tuning."""

    user: str
    host_label: str                 # known_hosts name: "host", "[host]:2222" or an instance id
    key_file: str = ""
    use_agent: bool = True
    pkey: paramiko.PKey | None = None   # an in-memory key (e.g. an ephemeral EIC key)
    host_key: str = ""              # pinned "ssh-ed25519 AAAA..." line
    known_hosts: str = ""           # path; default ~/.ssh/known_hosts
    timeout: float = 15.0
    window_size: int = WINDOW_SIZE
    max_packet: int = MAX_PACKET


def known_hosts_name(host: str, port: int = SSH_PORT) -> str:
    """How OpenSSH names a host in known_hosts."""
    return host if port == SSH_PORT else f"[{host}]:{port}"
