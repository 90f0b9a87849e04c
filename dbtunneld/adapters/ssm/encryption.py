"""KMS encryption of a session's stream payloads, as AWS's session-manager-plugin does it.

When the account's Session Manager preferences name a KMS key, the agent's HandshakeRequest
carries a ``KMSEncryption`` action (agent: agent/session/datachannel/datachannel.go
``buildHandshakeRequestPayload``, ``KMSKeyId`` and, from agent 3.1, a random ``Challenge``).
The client (plugin: src/datachannel/streaming.go ``ProcessKMSEncryptionHandshakeAction``,
src/encryption/kmsservice.go ``KMSGenerateDataKey``):

1. calls ``kms:GenerateDataKey`` with ``NumberOfBytes`` 64 and the encryption context
   ``{aws:ssm:SessionId, aws:ssm:TargetId}`` (plus ``aws:ssm:RandomChallenge`` when the agent
   sent a challenge and we acknowledge it, which the agent then requires for kms:Decrypt:
   agent/session/crypto/blockcipher.go ``UpdateEncryptionKey``);
2. answers the action with ``KMSCipherTextKey`` (the encrypted data key), ``KMSCipherTextHash``
   and ``ChallengeAcknowledgement``;
3. splits the 64-byte plaintext key in halves (src/encryption/encrypter.go
   ``generateEncryptionKey``): the client DEcrypts with the first half and ENcrypts with the
   second; the agent does the opposite (``UpdateEncryptionKey``: its encryption key is the first);
4. seals each payload with AES-256-GCM under a fresh random 12-byte nonce, sent in front of the
   ciphertext (``Encrypt`` / ``Decrypt``), no associated data;
5. answers the agent's EncChallengeRequest: decrypt its ``Challenge``, encrypt it again, send it
   back as EncChallengeResponse (``handleEncryptionChallengeRequest``).

Which payloads: the client encrypts what it sends as ``Output``; it decrypts ``Output``,
``StdErr`` and ``ExitCode`` from the agent (``SendInputDataMessage``, ``processIncomingMessage``).
The plaintext data key lives only in this object, never in logs or reprs.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ...core.errors import ProtocolError
from . import message as m

DATA_KEY_BYTES = 64
NONCE_BYTES = 12
ENCRYPTED_OUTGOING = frozenset({m.OUTPUT})
ENCRYPTED_INCOMING = frozenset({m.OUTPUT, m.STDERR, m.EXIT_CODE})


def encryption_context(session_id: str, target: str, challenge: str = "") -> dict[str, str]:
    context = {"aws:ssm:SessionId": session_id, "aws:ssm:TargetId": target}
    if challenge:
        context["aws:ssm:RandomChallenge"] = challenge
    return context


class SessionCipher:
    """The client's two AES-GCM keys for one session (built from GenerateDataKey's answer)."""

    def __init__(self, plaintext_key: bytes, ciphertext_key: bytes) -> None:
        if len(plaintext_key) != DATA_KEY_BYTES:
            raise ProtocolError(f"KMS data key has {len(plaintext_key)} bytes, expected {DATA_KEY_BYTES}")
        half = len(plaintext_key) // 2
        self._decrypt_with = AESGCM(plaintext_key[:half])
        self._encrypt_with = AESGCM(plaintext_key[half:])
        self.ciphertext_key = ciphertext_key

    def __repr__(self) -> str:
        return "SessionCipher(<keys hidden>)"

    def encrypt(self, plaintext: bytes) -> bytes:
        nonce = os.urandom(NONCE_BYTES)
        return nonce + self._encrypt_with.encrypt(nonce, plaintext, None)

    def decrypt(self, sealed: bytes) -> bytes:
        if len(sealed) < NONCE_BYTES + 16:
            raise ProtocolError(f"encrypted payload of {len(sealed)} bytes is too short")
        try:
            return self._decrypt_with.decrypt(sealed[:NONCE_BYTES], sealed[NONCE_BYTES:], None)
        except InvalidTag:
            raise ProtocolError("an encrypted payload failed its AES-GCM check (wrong key or corrupted)") from None

    def action_result(self, acknowledged_challenge: bool) -> dict[str, Any]:
        """The KMSEncryption ``ActionResult`` (Go marshals []byte as base64)."""
        return {
            "KMSCipherTextKey": _b64(self.ciphertext_key),
            "KMSCipherTextHash": _b64(hashlib.sha256(self.ciphertext_key).digest()),
            "ChallengeAcknowledgement": acknowledged_challenge,
        }

    def answer_challenge(self, request_payload: bytes) -> bytes:
        """The EncChallengeResponse payload for an EncChallengeRequest payload."""
        try:
            challenge = base64.b64decode(json.loads(request_payload)["Challenge"])
        except (ValueError, KeyError, TypeError) as exc:
            raise ProtocolError(f"malformed EncChallengeRequest: {exc}") from None
        return json.dumps({"Challenge": _b64(self.encrypt(self.decrypt(challenge)))}).encode()


def kms_request(parameters: dict[str, Any]) -> tuple[str, str]:
    """(key id, challenge) from the KMSEncryption action's parameters."""
    key_id = str(parameters.get("KMSKeyId") or "")
    if not key_id:
        raise ProtocolError("the agent asked for KMS encryption without a KMSKeyId")
    return key_id, str(parameters.get("Challenge") or "")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()
