"""Host-key verification for the bastion: only a key pinned in config (``bastion.host_key``) or
listed in known_hosts (hashed entries too) is accepted; an unknown key is never accepted blindly."""

from __future__ import annotations

import base64
import logging
import os

import paramiko

from ..core.errors import HostKeyError
from .ssh_options import SshOptions

log = logging.getLogger(__name__)


def verify_host_key(key: paramiko.PKey, options: SshOptions) -> None:
    """Accept only a key pinned in config or listed in known_hosts; raise HostKeyError."""
    expected = expected_keys(options)
    if any(_same_key(key, e) for e in expected):
        return
    seen = f"{key.get_name()} {key.fingerprint}"
    source = "bastion.host_key" if options.host_key else known_hosts_path(options)
    if any(e.get_name() == key.get_name() for e in expected):
        raise HostKeyError(
            f"host key of {options.host_label} does not match {source}: the server sent {seen}",
            hint=("someone may be intercepting the connection, or the bastion was rebuilt; "
                  "verify the new key with your admin, then update " + source))
    raise HostKeyError(
        f"host key of {options.host_label} is not known ({seen}); it is never accepted blindly",
        hint=(f'verify the fingerprint with your admin, then pin it: bastion.host_key = '
              f'"{key.get_name()} {key.get_base64()}" (or add it to {known_hosts_path(options)})'))


def prefer_known_key_types(transport: paramiko.Transport, options: SshOptions) -> None:
    """Ask for the host key types we can check first (as OpenSSH does)."""
    known = [k.get_name() for k in expected_keys(options)]
    if not known:
        return
    opts = transport.get_security_options()
    offered = tuple(opts.key_types)
    wanted = [t for t in offered if t in known or _base_type(t) in known]
    opts.key_types = tuple(wanted) + tuple(t for t in offered if t not in wanted)


def _base_type(key_type: str) -> str:
    return "ssh-rsa" if key_type in ("rsa-sha2-256", "rsa-sha2-512") else key_type


def _same_key(a: paramiko.PKey, b: paramiko.PKey) -> bool:
    return bool(a.get_name() == b.get_name() and a.asbytes() == b.asbytes())


def expected_keys(options: SshOptions) -> list[paramiko.PKey]:
    """The keys the server may show: the pinned one, else those known_hosts lists for it."""
    if options.host_key:
        return [parse_public_key(options.host_key)]
    return _known_host_keys(options)


def parse_public_key(line: str) -> paramiko.PKey:
    """Parse an OpenSSH public key line ("ssh-ed25519 AAAA... comment")."""
    parts = line.split()
    if len(parts) < 2:
        raise HostKeyError(f"bastion.host_key {line[:40]!r} is not an OpenSSH public key line",
                           hint='write it as in known_hosts: "ssh-ed25519 AAAA..."')
    try:
        key: paramiko.PKey = paramiko.PKey.from_type_string(parts[0], base64.b64decode(parts[1]))
    except Exception as exc:  # paramiko raises several types for a bad blob
        raise HostKeyError(f"bastion.host_key cannot be parsed: {exc}",
                           hint="copy the whole key line from ssh-keyscan or the admin") from None
    return key


def known_hosts_path(options: SshOptions) -> str:
    return os.path.expanduser(options.known_hosts or "~/.ssh/known_hosts")


def _known_host_keys(options: SshOptions) -> list[paramiko.PKey]:
    path = known_hosts_path(options)
    if not os.path.isfile(path):
        return []
    try:
        keys = paramiko.HostKeys(path).lookup(options.host_label) or {}
    except (OSError, paramiko.SSHException) as exc:
        log.warning("ssh: cannot read %s: %s", path, exc)
        return []
    return list(keys.values())
