"""Public-key authentication to the bastion: an in-memory key (an ephemeral key sent through
EC2 Instance Connect), a key file, or the keys of the ssh-agent, tried in that order."""

from __future__ import annotations

import io
import logging
import os
from typing import Any, Callable, Iterator

import paramiko

from ..core.errors import NeedsUserError, PermissionDeniedError
from .ssh_options import SshOptions

log = logging.getLogger(__name__)


def authenticate(transport: paramiko.Transport, options: SshOptions) -> None:
    """Log in with the first key the server accepts; PermissionDeniedError when none is.
    A connection that breaks off meanwhile raises paramiko's error (the caller classifies it)."""
    tried: list[str] = []
    for label, key in candidate_keys(options):
        tried.append(label)
        try:
            transport.auth_publickey(options.user, key)
        except paramiko.AuthenticationException:
            continue
        if transport.is_authenticated():
            return
    raise PermissionDeniedError(
        f"the bastion {options.host_label} refused user {options.user!r} "
        f"(tried: {', '.join(tried) or 'no keys'})",
        hint="check bastion.user and bastion.key_file, or load your key with `ssh-add`")


def candidate_keys(options: SshOptions) -> Iterator[tuple[str, paramiko.PKey]]:
    """(label for the error message, key) in the order they are offered."""
    if options.pkey is not None:
        yield "ephemeral key", options.pkey
    if options.key_file:
        yield options.key_file, load_private_key(options.key_file)
    if options.use_agent:
        for key in _agent_keys():
            yield f"agent key {key.fingerprint}", key


def load_private_key(path: str) -> paramiko.PKey:
    full = os.path.expanduser(path)
    try:
        key: paramiko.PKey = paramiko.PKey.from_path(full)
    except (paramiko.PasswordRequiredException, TypeError):  # TypeError: cryptography's "no password"
        raise NeedsUserError(f"the SSH key {path} is protected by a passphrase",
                             hint=f"load it into your agent (`ssh-add {path}`) and remove bastion.key_file") from None
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise NeedsUserError(f"cannot read the SSH key {path}: {exc}",
                             hint="point bastion.key_file at an OpenSSH private key") from None
    return key


def _agent_keys() -> list[paramiko.AgentKey]:
    if not os.environ.get("SSH_AUTH_SOCK"):
        return []
    try:
        agent = paramiko.Agent()
        return list(agent.get_keys())
    except paramiko.SSHException as exc:
        log.warning("ssh: the ssh-agent did not answer: %s", exc)
        return []


def ephemeral_key() -> paramiko.PKey:
    """A fresh in-memory Ed25519 key (never written to disk)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    pem = Ed25519PrivateKey.generate().private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    key: paramiko.PKey = paramiko.Ed25519Key.from_private_key(io.StringIO(pem.decode()))
    return key


def send_ephemeral_key(eic_client: Any, instance_id: str, os_user: str,
                       classify: Callable[[Exception, str], Exception]) -> paramiko.PKey:
    """Make a key, push its public half with EC2 Instance Connect (valid 60 s), return it."""
    key = ephemeral_key()
    try:
        eic_client.send_ssh_public_key(InstanceId=instance_id, InstanceOSUser=os_user,
                                       SSHPublicKey=f"{key.get_name()} {key.get_base64()}")
    except Exception as exc:
        raise classify(exc, f"EC2 Instance Connect to {instance_id}") from None
    log.info("ssh: sent an ephemeral key for %s@%s through EC2 Instance Connect", os_user, instance_id)
    return key
