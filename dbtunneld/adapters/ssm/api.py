"""The SSM API calls a session needs (StartSession, ResumeSession, TerminateSession) through boto3,
the SigV4 signature of the websocket upgrade, and the one place that classifies their errors.

botocore's own retries are off: the engine's loop owns retries (the data channel's bounded
resume is the only loop below it). Session tokens are secrets: they live in ``Grant`` (never in
its repr) and are never logged; stream URLs are logged without their query string.
"""

from __future__ import annotations

import logging
import re
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from . import session_registry
from ...core.errors import (
    ConfigError,
    DbtunneldError,
    NeedsUserError,
    PermissionDeniedError,
    Problem,
    SignInNeededError,
    TransientError,
)

log = logging.getLogger(__name__)

DOC_SSH = "AWS-StartSSHSession"
DOC_PORT_FORWARD_REMOTE = "AWS-StartPortForwardingSessionToRemoteHost"
WEBSOCKET_SERVICE = "ssmmessages"
KMS_DATA_KEY_BYTES = 64  # the plugin's KMSKeySizeInBytes: two AES-256 keys

_INSTANCE = re.compile(r"^(i|mi)-[0-9a-f]{8,17}$")
_ECS = re.compile(r"^ecs:[^_\s]+_[^_\s]+_[^\s]+$")

SIGN_IN_CODES = {"ExpiredToken", "ExpiredTokenException", "UnrecognizedClientException", "InvalidClientTokenId"}
PERMISSION_CODES = {"AccessDeniedException", "AccessDenied", "UnauthorizedOperation", "IncompleteSignatureException"}
KMS_KEY_CODES = {"NotFoundException", "DisabledException", "KMSInvalidStateException", "InvalidKeyUsageException"}
TARGET_CODES = {"InvalidTarget", "InvalidDocument", "InvalidParameters", "ValidationException", "InvalidDocumentVersion"}
TRANSIENT_CODES = {"TargetNotConnected", "ThrottlingException", "InternalServerError", "ServiceUnavailable"}


@dataclass(frozen=True)
class Grant:
    """What StartSession / ResumeSession hand out. ``token`` is a secret."""

    session_id: str
    stream_url: str
    token: str = field(repr=False)
    response: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)


def go_query_encode(query: str) -> str:
    """A query as aws-sdk-go v1 signs it: ``url.ParseQuery`` (``+`` is a space, ``%XX`` decoded),
    then ``Values.Encode()`` (keys sorted, ``url.QueryEscape``: all but ``A-Za-z0-9-_.~``
    escaped), then ``+`` -> ``%20`` (aws/signer/v4/v4.go ``buildCanonicalString``)."""
    pairs = urllib.parse.parse_qsl(query, keep_blank_values=True)
    ordered = sorted(range(len(pairs)), key=lambda i: pairs[i][0])  # stable: a key's values keep their order
    return "&".join(f"{_go_escape(pairs[i][0])}={_go_escape(pairs[i][1])}" for i in ordered)


def _go_escape(text: str) -> str:
    return urllib.parse.quote(text, safe="-_.~")


def is_presigned(query: str) -> bool:
    return any(key == "X-Amz-Signature" for key, _ in urllib.parse.parse_qsl(query, keep_blank_values=True))


def redact_url(url: str) -> str:
    """``url`` without its query string (where stream URLs may carry credentials)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


def validate_target(target: str) -> str:
    """An EC2/managed instance id or an ECS target ``ecs:<cluster>_<task-id>_<runtime-id>``."""
    if _INSTANCE.match(target) or _ECS.match(target):
        return target
    raise ConfigError(
        "ssm",
        [Problem("target", f"{target!r} is not an SSM target", "use an instance id (i-0123456789abcdef0) or ecs:<cluster>_<task-id>_<container-runtime-id>")],
    )


def ssh_parameters(port: int) -> dict[str, list[str]]:
    return {"portNumber": [str(_port(port))]}


def port_forward_parameters(host: str, port: int) -> dict[str, list[str]]:
    if not host:
        raise ConfigError("ssm", [Problem("host", "remote host is empty", "name the host the target should connect to")])
    return {"host": [host], "portNumber": [str(_port(port))]}


def _port(port: int) -> int:
    if not 0 < int(port) < 65536:
        raise ConfigError("ssm", [Problem("port", f"{port} is not a TCP port", "use 1-65535")])
    return int(port)


def start_session_request(target: str, document: str, parameters: dict[str, list[str]]) -> dict[str, Any]:
    return {"Target": validate_target(target), "DocumentName": document, "Parameters": parameters}


class SsmApi:
    """boto3 calls for one region/endpoint. Blocking: call it from a worker thread."""

    def __init__(self, boto3_session: Any, *, region: str | None = None, endpoint_url: str | None = None,
                 kms_endpoint_url: str | None = None) -> None:
        from botocore.config import Config

        self.boto3_session = boto3_session
        self.region = region or boto3_session.region_name
        if not self.region:
            raise NeedsUserError("no AWS region for the SSM session", hint="set aws.region in the config or a region in the AWS profile")
        self.endpoint_url = endpoint_url
        self.kms_endpoint_url = kms_endpoint_url
        config = Config(retries={"total_max_attempts": 1}, connect_timeout=10, read_timeout=30)
        self.client = boto3_session.client("ssm", region_name=self.region, endpoint_url=endpoint_url, config=config)
        self._config = config
        self._kms: Any = None
        self.ca_bundle = _ca_bundle(boto3_session)

    def start_session(self, target: str, document: str, parameters: dict[str, list[str]]) -> Grant:
        request = start_session_request(target, document, parameters)
        response = self._call("StartSession", f"target {target}", **request)
        log.info("SSM session %s started on %s (%s)", response["SessionId"], target, document)
        session_registry.opened(response["SessionId"])
        return _grant(response)

    def resume_session(self, session_id: str) -> Grant | None:
        """A fresh token for ``session_id``; None when the service says the session is over."""
        response = self._call("ResumeSession", f"session {session_id}", SessionId=session_id)
        if not response.get("TokenValue"):
            return None
        return _grant({**response, "SessionId": response.get("SessionId") or session_id})

    def terminate_session(self, session_id: str) -> None:
        self._call("TerminateSession", f"session {session_id}", SessionId=session_id)
        session_registry.ended(session_id)
        log.info("SSM session %s terminated", session_id)

    def generate_data_key(self, key_id: str, context: dict[str, str]) -> tuple[bytes, bytes]:
        """kms:GenerateDataKey for a KMS-encrypted session: (plaintext key, encrypted key)."""
        if self._kms is None:
            self._kms = self.boto3_session.client("kms", region_name=self.region, endpoint_url=self.kms_endpoint_url, config=self._config)
        try:
            response = self._kms.generate_data_key(KeyId=key_id, NumberOfBytes=KMS_DATA_KEY_BYTES, EncryptionContext=context)
        except Exception as exc:
            raise classify_error(exc, "kms:GenerateDataKey", f"key {key_id}") from exc
        return response["Plaintext"], response["CiphertextBlob"]

    def websocket_headers(self, stream_url: str) -> dict[str, str]:
        """SigV4 headers (service ``ssmmessages``) for the websocket upgrade GET of ``stream_url``.

        Signed as the session-manager-plugin signs it (aws-sdk-go v1): the canonical query is
        ``go_query_encode(query)``, while the URL itself is dialled unchanged. A presigned URL
        (``X-Amz-Signature`` in its query) is dialled as it is, with no headers.
        """
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest

        parts = urllib.parse.urlsplit(stream_url)
        if is_presigned(parts.query):
            return {}
        credentials = self.boto3_session.get_credentials()
        if credentials is None:
            raise SignInNeededError("no AWS credentials to sign the SSM data channel")
        scheme = {"wss": "https", "ws": "http"}.get(parts.scheme, parts.scheme)
        url = urllib.parse.urlunsplit((scheme, parts.netloc, parts.path, go_query_encode(parts.query), ""))
        request = AWSRequest(method="GET", url=url)  # botocore signs a URL's query as it is written
        SigV4Auth(credentials.get_frozen_credentials(), WEBSOCKET_SERVICE, self.region).add_auth(request)
        return {k: v for k, v in request.headers.items() if k.lower() in ("authorization", "x-amz-date", "x-amz-security-token")}

    def _call(self, operation: str, what: str, **kwargs: Any) -> dict[str, Any]:
        method = getattr(self.client, _snake(operation))
        try:
            result: dict[str, Any] = method(**kwargs)
            return result
        except Exception as exc:  # botocore raises many unrelated types; classify them in one place
            raise classify_error(exc, operation, what) from exc


def _ca_bundle(boto3_session: Any) -> str | None:
    """botocore's ``ca_bundle`` (``AWS_CA_BUNDLE`` or the profile's): the websocket trusts the same CAs."""
    try:
        return boto3_session._session.get_config_variable("ca_bundle") or None
    except Exception:  # not a real boto3 session (tests), or an unreadable config
        return None


def _snake(operation: str) -> str:
    return re.sub(r"(?<!^)([A-Z])", r"_\1", operation).lower()


def _grant(response: dict[str, Any]) -> Grant:
    return Grant(response["SessionId"], response["StreamUrl"], response["TokenValue"], response)


def classify_error(exc: BaseException, operation: str, what: str) -> DbtunneldError:
    """Map a botocore/boto3 exception to what the caller does about it."""
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError, TokenRetrievalError

    if isinstance(exc, DbtunneldError):
        return exc
    if isinstance(exc, (NoCredentialsError, TokenRetrievalError)) or type(exc).__name__ in {"SSOTokenLoadError", "UnauthorizedSSOTokenError"}:
        return SignInNeededError(f"SSM {operation} ({what}): AWS credentials missing or expired ({type(exc).__name__})")
    if isinstance(exc, ClientError):
        return _classify_client_error(exc, operation, what)
    if isinstance(exc, BotoCoreError):
        return TransientError(f"SSM {operation} ({what}): {exc}", hint="check the network path to the SSM endpoint")
    return TransientError(f"SSM {operation} ({what}): {type(exc).__name__}: {exc}")


def _classify_client_error(exc: Any, operation: str, what: str) -> DbtunneldError:
    error = exc.response.get("Error", {})
    code = error.get("Code", "")
    status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
    if code == str(status) == "403":  # an error body botocore could not parse (moto's IAM denials)
        code = "AccessDenied"
    text = f"SSM {operation} ({what}): {code}: {error.get('Message', '')}"
    if code in SIGN_IN_CODES:
        return SignInNeededError(text)
    if code in PERMISSION_CODES and operation.startswith("kms:"):
        return PermissionDeniedError(text, hint=f"Session Manager encrypts sessions with a KMS key: the role needs {operation} on it ({what})")
    if code in KMS_KEY_CODES:
        return NeedsUserError(text, hint="the KMS key named in the Session Manager preferences is missing or disabled")
    if code in PERMISSION_CODES:
        return PermissionDeniedError(text, hint="the role needs ssm:StartSession on the target and the document, ssm:ResumeSession and ssm:TerminateSession")
    if code in TARGET_CODES:
        return NeedsUserError(text, hint="check the target id and that the SSM document exists in this region")
    if code == "DoesNotExistException":
        return NeedsUserError(text, hint="the session is gone; start a new one")
    if code == "TargetNotConnected":
        return TransientError(text, hint="the SSM agent on the target is offline or not registered; is the instance running?")
    if code in TRANSIENT_CODES or status >= 500 or status == 429:
        return TransientError(text)
    return NeedsUserError(text, hint="see the AWS error code above")
