"""Fallback: AWS's ``session-manager-plugin`` run as the SSH ProxyCommand (opt-in, when installed).

We call StartSession ourselves (boto3) and hand the response to the plugin the way the AWS CLI
does, minus the CLI: ``session-manager-plugin <response> <region> StartSession <profile>
<parameters JSON> <ssm endpoint>``. The response holds the session token, so it goes in an
environment variable whose *name* is the first argument (``AWS_SSM_START_SESSION_RESPONSE_*``,
read and unset by plugins since 1.2.536.0), never in the process arguments. The plugin gets
the caller's AWS credentials in its environment for its own ResumeSession calls.

The plugin must be stopped with SIGINT: on SIGTERM it exits without ending the session, which
then stays open until the service's idle timeout. We also call TerminateSession after it exits.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import uuid
import weakref
from typing import Any

from ...core.errors import NeedsUserError, TransientError
from .api import DOC_SSH, SsmApi, ssh_parameters, start_session_request

log = logging.getLogger(__name__)

PLUGIN_NAME = "session-manager-plugin"
RESPONSE_ENV_PREFIX = "AWS_SSM_START_SESSION_RESPONSE"
INSTALL_HINT = (
    "install AWS's session-manager-plugin (https://docs.aws.amazon.com/systems-manager/latest/userguide/"
    "session-manager-working-with-install-plugin.html) or turn the plugin fallback off to use the built-in client"
)
STOP_TIMEOUT = 5.0


def find_plugin(path: str | None = None) -> str:
    """The plugin's path, or a ``NeedsUserError`` saying how to get it."""
    found = shutil.which(path or PLUGIN_NAME)
    if not found:
        raise NeedsUserError(f"{path or PLUGIN_NAME} is not installed (not found on PATH)", hint=INSTALL_HINT)
    return found


def plugin_command(binary: str, env_name: str, region: str, request: dict[str, Any], endpoint: str) -> list[str]:
    """The argument vector (the response itself travels in the environment variable ``env_name``)."""
    return [binary, env_name, region, "StartSession", "", json.dumps(request), endpoint]


# Plugins still running when the interpreter exits get their SIGINT then: they run in their own
# session (a terminal's Ctrl-C reaches the daemon, which stops them in order) and would outlive us.
_running: "weakref.WeakSet[PluginProxy]" = weakref.WeakSet()


@atexit.register
def _stop_running_plugins() -> None:
    for proxy in list(_running):
        proxy.close()


class PluginProxy:
    """A paramiko ProxyCommand-like object (send / recv / close / settimeout) over the plugin."""

    def __init__(self, argv: list[str], env: dict[str, str], *, api: SsmApi | None = None, session_id: str = "") -> None:
        self.argv = argv
        self.session_id = session_id
        self._api = api
        self.timeout: float | None = None
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, bufsize=0, start_new_session=True)
        self._stopped = False
        _running.add(self)

    @classmethod
    def start(cls, boto3_session: Any, target: str, *, port: int = 22, region: str | None = None, endpoint_url: str | None = None, plugin_path: str | None = None) -> "PluginProxy":
        """StartSession (``AWS-StartSSHSession``) through boto3, then the plugin on its response."""
        binary = find_plugin(plugin_path)
        api = SsmApi(boto3_session, region=region, endpoint_url=endpoint_url)
        request = start_session_request(target, DOC_SSH, ssh_parameters(port))
        grant = api.start_session(target, DOC_SSH, ssh_parameters(port))
        env_name = f"{RESPONSE_ENV_PREFIX}_{uuid.uuid4().hex[:12].upper()}"
        env = _child_env(boto3_session, api.region, {env_name: json.dumps(grant.response, default=str)})
        endpoint = endpoint_url or api.client.meta.endpoint_url
        try:
            return cls(plugin_command(binary, env_name, api.region, request, endpoint), env, api=api, session_id=grant.session_id)
        except OSError as exc:
            api.terminate_session(grant.session_id)
            raise TransientError(f"could not run {binary}: {exc}", hint=INSTALL_HINT) from None

    # --- socket-like interface used by paramiko.Transport ----------------------------------

    def send(self, data: bytes) -> int:
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(data)
        except (OSError, ValueError) as exc:
            raise OSError(f"{PLUGIN_NAME} input closed: {exc}") from None
        return len(data)

    def recv(self, size: int) -> bytes:
        """Up to ``size`` bytes; b'' at EOF; ``socket.timeout`` when nothing came within the timeout."""
        stdout = self.process.stdout
        assert stdout is not None
        ready, _, _ = select.select([stdout], [], [], self.timeout)
        if not ready:
            raise socket.timeout()
        return os.read(stdout.fileno(), size)

    def settimeout(self, timeout: float | None) -> None:
        self.timeout = timeout

    @property
    def closed(self) -> bool:
        return self._stopped or self.process.poll() is not None

    @property
    def _closed(self) -> bool:  # paramiko checks this name
        return self.closed

    def close(self) -> None:
        """SIGINT (the plugin then ends the session), wait, escalate only if it hangs; TerminateSession."""
        if self._stopped:
            return
        self._stopped = True
        _running.discard(self)
        self._signal(signal.SIGINT)
        try:
            self.process.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            log.warning("%s did not stop within %.0f s of SIGINT; killing it", PLUGIN_NAME, STOP_TIMEOUT)
            self.process.kill()
            self.process.wait()
        for pipe in (self.process.stdin, self.process.stdout):
            if pipe is not None:
                pipe.close()
        if self._api is not None and self.session_id:
            try:
                self._api.terminate_session(self.session_id)
            except Exception as exc:
                log.warning("TerminateSession %s after the plugin stopped: %s", self.session_id, exc)

    def _signal(self, signum: int) -> None:
        if self.process.poll() is None:
            try:
                self.process.send_signal(signum)
            except ProcessLookupError:
                pass

    def __enter__(self) -> "PluginProxy":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _child_env(boto3_session: Any, region: str, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(RESPONSE_ENV_PREFIX)}
    env.update(extra)
    env["AWS_REGION"] = env["AWS_DEFAULT_REGION"] = region
    credentials = boto3_session.get_credentials()
    if credentials is not None:
        frozen = credentials.get_frozen_credentials()
        env["AWS_ACCESS_KEY_ID"] = frozen.access_key
        env["AWS_SECRET_ACCESS_KEY"] = frozen.secret_key
        if frozen.token:
            env["AWS_SESSION_TOKEN"] = frozen.token
        else:
            env.pop("AWS_SESSION_TOKEN", None)
        env.pop("AWS_PROFILE", None)
    return env

