"""The agent's handshake on an SSM data channel, spoken like the session-manager-plugin.

Owns what the handshake settles: the HandshakeRequest's client actions (the session type, KMS
encryption with its data key), the encryption challenge, HandshakeComplete, and so the session's
``Handshake`` and ``SessionCipher``. The channel (``channel``) routes these payloads here.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from ...core.errors import DbtunneldError, NeedsUserError, ProtocolError
from . import message as m
from .encryption import SessionCipher, encryption_context, kms_request

log = logging.getLogger(__name__)

# Reported in the handshake. The agent compares it: above 1.2.331.0 it disables smux keepalive
# and keeps idle port sessions open; at or above 1.1.70 it multiplexes port-forward sessions.
CLIENT_VERSION = "1.2.650.0"


@dataclass
class Handshake:
    agent_version: str = ""
    session_type: str = ""
    properties: dict[str, Any] = field(default_factory=dict)

    @property
    def multiplexed(self) -> bool:
        return self.session_type == "Port" and self.properties.get("type") == "LocalPortForwarding"


class AgentHandshake:
    """One session's side of the handshake. ``completed`` resolves with the ``Handshake`` (or fails);
    ``cipher`` is set once the agent asks for KMS encryption and applies from then on."""

    def __init__(
        self,
        session_id: str,
        target: str,
        client_version: str,
        generate_data_key: Callable[[str, dict[str, str]], tuple[bytes, bytes]],
        send: Callable[[int, bytes], Awaitable[None]],
        fail: Callable[[DbtunneldError], Awaitable[None]],
        label: str,
    ) -> None:
        self.session_id = session_id
        self.target = target
        self.info = Handshake()
        self.cipher: SessionCipher | None = None
        self.completed: asyncio.Future[Handshake] = asyncio.get_running_loop().create_future()
        self._client_version = client_version
        self._generate_data_key = generate_data_key
        self._send = send
        self._fail = fail
        self._label = label

    async def on_request(self, msg: m.AgentMessage) -> None:
        request = m.json_payload(msg)
        self.info.agent_version = str(request.get("AgentVersion") or "")
        processed, errors, failure = [], [], None
        for action in request.get("RequestedClientActions") or []:
            try:
                result = await self._process_action(action)
            except DbtunneldError as exc:  # KMS refused: tell the agent, then end with this error
                failure = failure or exc
                result = {"ActionType": action.get("ActionType"), "ActionStatus": 2, "ActionResult": None, "Error": f"Failed to process action {action.get('ActionType')}: {exc.message}"}
            processed.append(result)
            if result["ActionStatus"] != 1:
                errors.append(result["Error"])
        payload = m.handshake_response(self._client_version, processed, errors)
        await self._send(m.HANDSHAKE_RESPONSE, payload)
        if errors:
            await self._fail(failure or NeedsUserError(f"SSM session {self.session_id}: {'; '.join(errors)}", hint="update dbtunneld, or use the session-manager-plugin fallback"))

    async def _process_action(self, action: dict[str, Any]) -> dict[str, Any]:
        kind = action.get("ActionType")
        params = action.get("ActionParameters") or {}
        if kind == "KMSEncryption":
            return await self._kms_encryption(params)
        if kind == "SessionType" and params.get("SessionType") == "Port":
            self.info.session_type = "Port"
            self.info.properties = dict(params.get("Properties") or {})
            return {"ActionType": kind, "ActionStatus": 1, "ActionResult": None, "Error": ""}
        if kind == "SessionType":
            error = f"session type {params.get('SessionType')!r} is not supported (only port sessions)"
        else:
            error = f"unsupported action {kind}"
        return {"ActionType": kind, "ActionStatus": 3 if kind != "SessionType" else 2, "ActionResult": None, "Error": error}

    async def _kms_encryption(self, params: dict[str, Any]) -> dict[str, Any]:
        """GenerateDataKey for the session (see ``encryption``); the keys apply from now on."""
        key_id, challenge = kms_request(params)
        context = encryption_context(self.session_id, self.target, challenge)
        loop = asyncio.get_running_loop()
        plaintext, blob = await loop.run_in_executor(None, self._generate_data_key, key_id, context)
        self.cipher = SessionCipher(plaintext, blob)
        log.info("%s session encrypted with KMS key %s", self._label, key_id)
        return {"ActionType": "KMSEncryption", "ActionStatus": 1, "ActionResult": self.cipher.action_result(bool(challenge)), "Error": ""}

    async def on_encryption_challenge(self, msg: m.AgentMessage) -> None:
        if self.cipher is None:
            await self._fail(ProtocolError(f"SSM session {self.session_id}: encryption challenge without a KMSEncryption handshake"))
            return
        try:
            answer = self.cipher.answer_challenge(msg.payload)
        except ProtocolError as exc:
            await self._fail(ProtocolError(f"SSM session {self.session_id}: {exc.message}"))
            return
        await self._send(m.ENC_CHALLENGE_RESPONSE, answer)

    def on_complete(self, msg: m.AgentMessage) -> None:
        if self.completed.done():
            return
        if not self.info.session_type:
            error = ProtocolError(f"SSM session {self.session_id}: handshake completed without a session type")
            self.completed.set_exception(error)
            return
        log.info("%s handshake complete (agent %s, %s)", self._label, self.info.agent_version, "multiplexed" if self.info.multiplexed else "stream")
        self.completed.set_result(self.info)
