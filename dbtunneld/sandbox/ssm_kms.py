"""The agent's half of a KMS-encrypted session, for the SSM stand-in (its own code, not the client's).

Written from aws/amazon-ssm-agent:

* agent/session/datachannel/datachannel.go ``buildHandshakeRequestPayload``: the HandshakeRequest
  carries ``{"ActionType": "KMSEncryption", "ActionParameters": {"KMSKeyId", "Challenge"}}``,
  the challenge being 16 random bytes, base64 (crypto/blockcipher.go ``NewBlockCipherKMS``);
* ``handleHandshakeResponse`` / ``finalizeKMSEncryption``: any action whose ActionStatus is not 1
  fails the handshake; the KMSEncryption ``ActionResult`` gives ``KMSCipherTextKey`` (base64, as
  Go marshals []byte) and ``ChallengeAcknowledgement``; with ``RequireKMSChallengeResponse`` set
  an unacknowledged challenge fails it;
* crypto/blockcipher.go ``UpdateEncryptionKey``: ``kms:Decrypt`` of that blob with the context
  ``{aws:ssm:SessionId, aws:ssm:TargetId}`` (+ ``aws:ssm:RandomChallenge`` when acknowledged) and
  the key id (crypto/kmsservice.go ``Decrypt``); the 64-byte key's FIRST half encrypts what the
  agent sends, the second half decrypts what it receives; AES-GCM, 12-byte nonce in front;
* ``sendEncryptionChallenge`` / ``handleEncryptionChallengeResponse``: 64 random bytes, encrypted,
  sent as EncChallengeRequest ``{"Challenge": base64}``; the client's EncChallengeResponse must
  decrypt to the same bytes, else the session fails;
* ``SendStreamDataMessage`` encrypts Output / StdErr / ExitCode payloads it sends;
  ``processStreamDataMessage`` decrypts Output payloads it receives.

KMS is reached with the agent's own credentials (the instance role): a real KMS (moto in the
sandbox) decides whether the blob, key and context match. Keys never appear in logs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from . import ssm_wire as w

NONCE = 12
CHALLENGE_BYTES = 64
RANDOM_CHALLENGE_BYTES = 16
CHALLENGE_TIMEOUT = 15.0  # the agent's handshakeTimeout
ENC_CHALLENGE_REQUEST, ENC_CHALLENGE_RESPONSE = 8, 9  # payload types (contracts/agentmessage.go)


class KmsHandshakeError(ValueError):
    """The client's KMS answer is unusable: the agent cancels the session with this text."""


@dataclass
class KmsSettings:
    """The account's Session Manager encryption preference, as the stand-in applies it."""

    key_id: str
    endpoint_url: str
    region: str = "us-east-1"
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)
    require_challenge: bool = False  # RequireKMSChallengeResponse in the agent's config

    def client(self) -> Any:
        import boto3

        return boto3.client("kms", endpoint_url=self.endpoint_url, region_name=self.region,
                            aws_access_key_id=self.access_key_id or None, aws_secret_access_key=self.secret_access_key or None)


class KmsEncryption:
    """One session's KMSEncryption: its handshake action (``ssm_agent.HandshakeAction``: parameters,
    ``finalize``, ``confirm``) and, once confirmed, its ``AgentSession.cipher`` (encrypt / decrypt)."""

    action_type = "KMSEncryption"

    def __init__(self, settings: KmsSettings, session_id: str, target: str) -> None:
        self.settings = settings
        self.session_id = session_id
        self.target = target
        self.random_challenge = base64.b64encode(os.urandom(RANDOM_CHALLENGE_BYTES)).decode()
        self._blob = b""
        self._acknowledged = False
        self._seal: AESGCM | None = None
        self._open: AESGCM | None = None
        self._answer: asyncio.Future[bytes] | None = None

    def __repr__(self) -> str:
        return f"KmsEncryption(session={self.session_id}, key={self.settings.key_id})"

    def parameters(self) -> dict[str, Any]:
        return {"KMSKeyId": self.settings.key_id, "Challenge": self.random_challenge}

    def finalize(self, result: Any) -> None:
        """finalizeKMSEncryption's checks of the client's ActionResult."""
        if not isinstance(result, dict) or not result.get("KMSCipherTextKey"):
            raise KmsHandshakeError("KMSEncryption result without KMSCipherTextKey")
        self._acknowledged = bool(result.get("ChallengeAcknowledgement"))
        if self.settings.require_challenge and not self._acknowledged:
            raise KmsHandshakeError("client does not support required encryption context random challenge")
        self._blob = base64.b64decode(result["KMSCipherTextKey"])

    async def confirm(self, session: Any) -> None:
        """UpdateEncryptionKey (kms:Decrypt, in a thread), then the encryption challenge."""
        context = {"aws:ssm:SessionId": self.session_id, "aws:ssm:TargetId": self.target}
        if self._acknowledged:
            context["aws:ssm:RandomChallenge"] = self.random_challenge
        loop = asyncio.get_running_loop()
        try:
            plain = await loop.run_in_executor(None, self._kms_decrypt, self._blob, context)
        except Exception as exc:
            raise KmsHandshakeError(f"Unable to retrieve data key, {type(exc).__name__}: {exc}") from None
        if len(plain) != 64:
            raise KmsHandshakeError(f"data key of {len(plain)} bytes, expected 64")
        self._seal, self._open = AESGCM(plain[:32]), AESGCM(plain[32:])
        await self._challenge(session, loop)
        session.cipher = self

    async def _challenge(self, session: Any, loop: asyncio.AbstractEventLoop) -> None:
        self._answer = loop.create_future()
        session.payload_handlers[ENC_CHALLENGE_RESPONSE] = self._on_answer
        challenge = os.urandom(CHALLENGE_BYTES)
        payload = json.dumps({"Challenge": base64.b64encode(self.encrypt(challenge)).decode()}).encode()
        await session.send_stream(ENC_CHALLENGE_REQUEST, payload)
        try:
            answer = await asyncio.wait_for(self._answer, CHALLENGE_TIMEOUT)
        except asyncio.TimeoutError:
            raise KmsHandshakeError("Timed out waiting for encryption challenge.") from None
        try:
            echoed = self.decrypt(base64.b64decode(json.loads(answer)["Challenge"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise KmsHandshakeError(f"EncryptionChallengeResponse unusable: {exc}") from None
        if echoed != challenge:
            raise KmsHandshakeError("Encryption challenge does not match!")

    async def _on_answer(self, msg: Any) -> None:
        if self._answer is not None and not self._answer.done():
            self._answer.set_result(msg.payload)

    def _kms_decrypt(self, blob: bytes, context: dict[str, str]) -> bytes:
        response = self.settings.client().decrypt(CiphertextBlob=blob, EncryptionContext=context, KeyId=self.settings.key_id)
        return response["Plaintext"]

    def encrypt(self, plaintext: bytes) -> bytes:
        assert self._seal is not None
        nonce = os.urandom(NONCE)
        return nonce + self._seal.encrypt(nonce, plaintext, None)

    def decrypt(self, sealed: bytes) -> bytes:
        """The agent's decryption key; a bad tag is a message the agent refuses (not acknowledged)."""
        assert self._open is not None
        try:
            return self._open.decrypt(sealed[:NONCE], sealed[NONCE:], None)
        except InvalidTag:
            raise w.WireError("Error decrypting encrypted text") from None
