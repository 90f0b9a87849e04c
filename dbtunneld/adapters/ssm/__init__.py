"""The SSM Session Manager data channel, spoken natively (no AWS CLI, no session-manager-plugin).

Public API (blocking; each session runs its own event-loop thread)::

    from dbtunneld.adapters import ssm

    # AWS-StartSSHSession: a byte stream to the target's sshd, for paramiko
    s = ssm.start_ssh_session(boto3_session, "i-0123456789abcdef0", port=22)
    transport = paramiko.Transport(s.sock)      # s.sock is a real socket
    ...
    s.close()                                   # TerminateSession flag + API call; idempotent

    # AWS-StartPortForwardingSessionToRemoteHost: one smux stream per client connection
    pf = ssm.start_port_forward(boto3_session, "ecs:demo_0123abcd_0123abcd-456", "db.internal", 3306)
    conn = pf.open_stream(timeout=10)           # a connected socket to db.internal:3306
    ...
    pf.close()

Both sessions have ``session_id``, ``target``, ``closed`` (a ``threading.Event``),
``wait_closed(timeout)``, ``on_closed(callback)`` (once, when it ends), ``is_alive()``,
``last_error`` (why it ended underneath: the service terminated it, a resume failed...),
``stats`` and ``close()``; they are context managers.
``start_*`` raise the project's errors: ``ConfigError`` (bad target/port), ``SignInNeededError``,
``PermissionDeniedError`` (e.g. no kms:GenerateDataKey for a KMS-encrypted session),
``NeedsUserError`` (old agents, a disabled KMS key),
``TransientError`` (network, agent offline, no handshake). A session never retries behind the
caller's back except to resume its own websocket when AWS recycles it (bounded).

Targets: EC2 / managed instance ids (``i-...``, ``mi-...``) and ECS targets
``ecs:<cluster>_<task-id>_<container-runtime-id>``. ``region`` and ``endpoint_url`` override the
boto3 session's (the endpoint is the SSM API; stream URLs come back from StartSession);
``kms_endpoint_url`` the KMS API's (sessions encrypted by the Session Manager preferences).
The websocket honours HTTPS_PROXY / NO_PROXY and AWS_CA_BUNDLE (``netpath``).

Fallback: ``PluginProxy.start(boto3_session, target, port=22)`` runs AWS's session-manager-plugin
as a paramiko ProxyCommand-like object (stopped with SIGINT); ``NeedsUserError`` when missing.

Modules: ``message`` (framing), ``reliability`` (acks, resend timing, reordering), ``smux``,
``channel`` (the websocket protocol), ``session`` (the blocking faces), ``api`` (boto3 calls,
SigV4 websocket signing, error classification), ``encryption`` (KMS-encrypted sessions),
``netpath`` (proxies, CA bundle), ``session_registry`` (ids of open sessions, for crash
recovery), ``plugin`` (the fallback).
"""

from __future__ import annotations

from typing import Any

from .api import DOC_PORT_FORWARD_REMOTE, DOC_SSH, SsmApi, port_forward_parameters, ssh_parameters
from .channel_handshake import CLIENT_VERSION
from .channel_options import ChannelOptions
from .plugin import PluginProxy, find_plugin
from .session import PortForwardSession, SsmSession, open_session

__all__ = [
    "CLIENT_VERSION",
    "ChannelOptions",
    "PluginProxy",
    "PortForwardSession",
    "SsmSession",
    "find_plugin",
    "start_port_forward",
    "start_ssh_session",
]

OPEN_TIMEOUT = 45.0


def start_ssh_session(
    boto3_session: Any,
    target: str,
    *,
    port: int = 22,
    endpoint_url: str | None = None,
    region: str | None = None,
    options: ChannelOptions | None = None,
    timeout: float = OPEN_TIMEOUT,
    kms_endpoint_url: str | None = None,
) -> SsmSession:
    """Start ``AWS-StartSSHSession`` on ``target`` and return once the agent's handshake is done."""
    api = SsmApi(boto3_session, region=region, endpoint_url=endpoint_url, kms_endpoint_url=kms_endpoint_url)
    grant = api.start_session(target, DOC_SSH, ssh_parameters(port))
    session: SsmSession = open_session(SsmSession, api, grant, target, options, timeout)
    return session


def start_port_forward(
    boto3_session: Any,
    target: str,
    host: str,
    port: int,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    options: ChannelOptions | None = None,
    timeout: float = OPEN_TIMEOUT,
    kms_endpoint_url: str | None = None,
) -> PortForwardSession:
    """Start ``AWS-StartPortForwardingSessionToRemoteHost`` (``host:port`` as seen from ``target``)."""
    api = SsmApi(boto3_session, region=region, endpoint_url=endpoint_url, kms_endpoint_url=kms_endpoint_url)
    grant = api.start_session(target, DOC_PORT_FORWARD_REMOTE, port_forward_parameters(host, port))
    session: PortForwardSession = open_session(PortForwardSession, api, grant, target, options, timeout)
    return session
