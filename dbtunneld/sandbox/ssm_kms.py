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

NONCE = 12
CHALLENGE_BYTES = 64
RANDOM_CHALLENGE_BYTES = 16
OUTPUT, STDERR, EXIT_CODE = 1, 11, 12  # payload types (agent/session/contracts/agentmessage.go)
ENC_CHALLENGE_REQUEST, ENC_CHALLENGE_RESPONSE = 8, 9
SENT_ENCRYPTED = frozenset({OUTPUT, STDERR, EXIT_CODE})
RECEIVED_ENCRYPTED = frozenset({OUTPUT})


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


class AgentCipher:
    """One session's agent-side encryption state; also its handshake action (``ssm_agent.HandshakeAction``)."""

    action_type = "KMSEncryption"

    def __init__(self, settings: KmsSettings, session_id: str, target: str) -> None:
        self.settings = settings
        self.session_id = session_id
        self.target = target
        self.random_challenge = base64.b64encode(os.urandom(RANDOM_CHALLENGE_BYTES)).decode()
        self._seal: AESGCM | None = None
        self._open: AESGCM | None = None
        self._challenge = b""

    def __repr__(self) -> str:
        return f"AgentCipher(session={self.session_id}, key={self.settings.key_id})"

    @property
    def ready(self) -> bool:
        return self._seal is not None

    def parameters(self) -> dict[str, Any]:
        return {"KMSKeyId": self.settings.key_id, "Challenge": self.random_challenge}

    async def finalize(self, result: Any) -> None:
        """Decrypt the client's data key through KMS (blocking call in a thread)."""
        if not isinstance(result, dict) or not result.get("KMSCipherTextKey"):
            raise KmsHandshakeError("KMSEncryption result without KMSCipherTextKey")
        acknowledged = bool(result.get("ChallengeAcknowledgement"))
        if self.settings.require_challenge and not acknowledged:
            raise KmsHandshakeError("client does not support required encryption context random challenge")
        blob = base64.b64decode(result["KMSCipherTextKey"])
        context = {"aws:ssm:SessionId": self.session_id, "aws:ssm:TargetId": self.target}
        if acknowledged:
            context["aws:ssm:RandomChallenge"] = self.random_challenge
        loop = asyncio.get_running_loop()
        try:
            plain = await loop.run_in_executor(None, self._kms_decrypt, blob, context)
        except Exception as exc:
            raise KmsHandshakeError(f"Unable to retrieve data key, {type(exc).__name__}: {exc}") from None
        if len(plain) != 64:
            raise KmsHandshakeError(f"data key of {len(plain)} bytes, expected 64")
        self._seal, self._open = AESGCM(plain[:32]), AESGCM(plain[32:])

    def _kms_decrypt(self, blob: bytes, context: dict[str, str]) -> bytes:
        response = self.settings.client().decrypt(CiphertextBlob=blob, EncryptionContext=context, KeyId=self.settings.key_id)
        return response["Plaintext"]

    def seal(self, plaintext: bytes) -> bytes:
        assert self._seal is not None
        nonce = os.urandom(NONCE)
        return nonce + self._seal.encrypt(nonce, plaintext, None)

    def open(self, sealed: bytes) -> bytes:
        assert self._open is not None
        try:
            return self._open.decrypt(sealed[:NONCE], sealed[NONCE:], None)
        except InvalidTag:
            raise KmsHandshakeError("Error decrypting encrypted text") from None

    def challenge_request(self) -> bytes:
        self._challenge = os.urandom(CHALLENGE_BYTES)
        return json.dumps({"Challenge": base64.b64encode(self.seal(self._challenge)).decode()}).encode()

    def check_challenge_response(self, payload: bytes) -> None:
        try:
            answer = self.open(base64.b64decode(json.loads(payload)["Challenge"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise KmsHandshakeError(f"Unmarshalling of EncryptionChallengeResponse message failed, {exc}") from None
        if answer != self._challenge:
            raise KmsHandshakeError("Encryption challenge does not match!")
