"""KMS-encrypted SSM sessions: the client's GenerateDataKey + AES-GCM against the stand-in's agent side.

The stand-in (its own process) plays an agent whose account encrypts sessions with a KMS key:
it asks for KMSEncryption with a random challenge, decrypts the client's data key through the
sandbox's moto KMS with its own credentials (SigV4 and IAM enforced), checks the encryption
challenge and then decrypts every Output payload it receives (a client that did not encrypt,
or used the wrong half of the key, ends the session). The client uses the developer role's
real moto credentials.
"""

from __future__ import annotations

import base64
import json
import os

import boto3
import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from dbtunneld.adapters.ssm import start_port_forward
from dbtunneld.adapters.ssm.encryption import SessionCipher, encryption_context
from dbtunneld.core.errors import PermissionDeniedError
from dbtunneld.sandbox.ssm_testkit import DataServer, StandInProcess, download, pattern_digest, upload

TARGET = "i-0123456789abcdef0"


def test_client_encrypts_with_the_second_half_and_decrypts_with_the_first():
    key = os.urandom(64)
    cipher = SessionCipher(key, b"blob")
    sealed = cipher.encrypt(b"to the agent")
    assert AESGCM(key[32:]).decrypt(sealed[:12], sealed[12:], None) == b"to the agent"
    nonce = os.urandom(12)
    from_agent = nonce + AESGCM(key[:32]).encrypt(nonce, b"from the agent", None)
    assert cipher.decrypt(from_agent) == b"from the agent"
    assert cipher.encrypt(b"x")[:12] != cipher.encrypt(b"x")[:12]          # a fresh nonce each time
    result = cipher.action_result(True)
    assert base64.b64decode(result["KMSCipherTextKey"]) == b"blob" and result["ChallengeAcknowledgement"] is True
    assert key.hex() not in repr(cipher)


def test_encryption_context_names_session_target_and_challenge():
    assert encryption_context("s-1", "i-1") == {"aws:ssm:SessionId": "s-1", "aws:ssm:TargetId": "i-1"}
    assert encryption_context("s-1", "i-1", "Y2g=")["aws:ssm:RandomChallenge"] == "Y2g="


@pytest.fixture(scope="module")
def data_server():
    server = DataServer()
    yield server
    server.close()


@pytest.fixture
def kms_standin(stack, data_server, tmp_path):
    seed = json.loads(stack.seed_file.read_text())["kms"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_ACCESS_KEY_ID=seed["agent"]["access_key_id"], AWS_SECRET_ACCESS_KEY=seed["agent"]["secret_access_key"])
    proc = StandInProcess("--target", f"{TARGET}=127.0.0.1:{data_server.port}", "--allow-remote", "127.0.0.1",
                          "--kms-key-id", seed["alias"], "--kms-endpoint", stack.info.aws_endpoint, "--kms-require-challenge",
                          "--accept-unknown-keys", env=env, log_path=str(tmp_path / "standin.log"))
    proc.start()
    yield proc
    proc.stop()


def _role_session(stack, role: str = "db-developer") -> boto3.Session:
    return boto3.Session(**stack.role_credentials(role), region_name="us-east-1")


def test_kms_encrypted_session_carries_data_both_ways(stack, data_server, kms_standin):
    with start_port_forward(_role_session(stack), TARGET, "127.0.0.1", data_server.port,
                            endpoint_url=kms_standin.url, kms_endpoint_url=stack.info.aws_endpoint) as session:
        with session.open_stream(timeout=10) as sock:
            digest, _ = download(sock, 400_000, seed=3)
        with session.open_stream(timeout=10) as sock:
            echoed = upload(sock, 200_000, seed=4)
        assert digest == pattern_digest(400_000, seed=3) and echoed == pattern_digest(200_000, seed=4)
        assert session.is_alive()
    row = kms_standin.session(session.session_id)
    assert row["Reason"] != "" and "decrypt" not in row["Reason"].lower() and "challenge" not in row["Reason"].lower()


def test_role_without_generate_data_key_is_told_which_permission(stack, data_server, kms_standin):
    with pytest.raises(PermissionDeniedError) as raised:
        start_port_forward(_role_session(stack, "analyst"), TARGET, "127.0.0.1", data_server.port,
                           endpoint_url=kms_standin.url, kms_endpoint_url=stack.info.aws_endpoint, timeout=20)
    assert "kms:GenerateDataKey" in raised.value.hint
    assert kms_standin.sessions()[-1]["Status"] == "Terminated"


def test_forged_kms_signature_is_refused_by_moto(stack, data_server, kms_standin):
    creds = stack.role_credentials()
    creds["aws_secret_access_key"] = "not-" + creds["aws_secret_access_key"]
    with pytest.raises(Exception) as raised:
        start_port_forward(boto3.Session(**creds, region_name="us-east-1"), TARGET, "127.0.0.1", data_server.port,
                           endpoint_url=kms_standin.url, kms_endpoint_url=stack.info.aws_endpoint, timeout=20)
    assert "SignatureDoesNotMatch" in str(raised.value) or "InvalidSignature" in str(raised.value)
