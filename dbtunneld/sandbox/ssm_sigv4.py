"""SigV4 verification for the SSM stand-in: the data-channel websocket upgrade and the API calls.

The upgrade is signed the way AWS's Go code signs its Session Manager websockets
(aws/amazon-ssm-agent ``agent/session/communicator/websocketchannel.go``:
``getV4SignatureHeader`` builds ``http.NewRequest("GET", url)`` and calls aws-sdk-go v1's
``v4.Signer.Sign``; the URL is dialled unchanged, and a presigned URL is dialled with no
headers; REAL-SYSTEMS.md says session-manager-plugin releases from 1.2.688 do the same; the
plugin snapshot readable here, 1.2.650, does not sign yet). aws-sdk-go v1
(``aws/signer/v4/v4.go``: ``signingCtx.buildCanonicalString``) builds the canonical query from
``ctx.Query.Encode()`` with ``+`` turned into ``%20``: the query is *decoded* first (``+`` in
the URL means a space) and every value re-escaped with ``url.QueryEscape``, so a raw ``/``,
``=`` or ``+`` in the stream URL's query is signed as ``%2F``, ``%3D``, ``%20``. The canonical
URI is ``EscapePath`` of the escaped path. The service canonicalises what it receives the same
way; so does this module, independently of botocore and of the client. Presigned URLs
(``X-Amz-Signature`` in the query) are accepted too: the signature left out of the canonical
query, the payload hashed as for headers (``buildBodyDigest``: ``UNSIGNED-PAYLOAD`` is for S3
presigns only).

``credentials`` maps access key ids to secret keys. A key not in the map is refused
(``InvalidClientTokenId``, as AWS does) unless ``accept_unknown_keys`` is on: the sandbox stack,
whose keys moto mints at run time, checks everything but the HMAC for those (said in the log).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

log = logging.getLogger(__name__)

ALGORITHM = "AWS4-HMAC-SHA256"
MAX_SKEW = datetime.timedelta(minutes=15)
_GO_SAFE = "-_.~"  # url.QueryEscape leaves letters, digits and these alone (shouldEscape, encodeQueryComponent)


class SignatureError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass(frozen=True)
class SignedBy:
    access_key: str
    region: str
    service: str
    verified: bool  # False only for an unknown key under accept_unknown_keys


def go_query_encode(raw_query: str, drop: tuple[str, ...] = ()) -> str:
    """``url.ParseQuery(raw).Encode()`` with ``+`` -> ``%20`` (sorted by key, values in order)."""
    pairs: dict[str, list[str]] = {}
    for part in raw_query.split("&") if raw_query else ():
        if not part:
            continue
        key, _, value = part.partition("=")
        key, value = urllib.parse.unquote_plus(key), urllib.parse.unquote_plus(value)
        if key not in drop:
            pairs.setdefault(key, []).append(value)
    quote = lambda text: urllib.parse.quote(text, safe=_GO_SAFE)  # noqa: E731
    return "&".join(f"{quote(k)}={quote(v)}" for k in sorted(pairs) for v in pairs[k])


def canonical_request(method: str, path: str, query: str, headers: Mapping[str, str], signed: list[str], payload_hash: str) -> str:
    canonical_headers = "".join(f"{name}:{' '.join(headers.get(name, '').split())}\n" for name in signed)
    uri = urllib.parse.quote(path or "/", safe="/-_.~")  # v4.go: EscapePath of the escaped path
    return "\n".join([method, uri, query, canonical_headers, ";".join(signed), payload_hash])


def signature(secret: str, date: str, region: str, service: str, amz_date: str, request: str) -> str:
    key = ("AWS4" + secret).encode()
    for part in (date, region, service, "aws4_request"):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    scope = f"{date}/{region}/{service}/aws4_request"
    to_sign = "\n".join([ALGORITHM, amz_date, scope, hashlib.sha256(request.encode()).hexdigest()])
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


class Verifier:
    def __init__(self, credentials: Mapping[str, str] | None = None, *, accept_unknown_keys: bool = False) -> None:
        self.credentials = dict(credentials or {})
        self.accept_unknown_keys = accept_unknown_keys
        self._warned: set[str] = set()

    def verify(self, method: str, target: str, headers: Mapping[str, str], body: bytes, service: str, now: datetime.datetime | None = None) -> SignedBy:
        """Check a request's SigV4 (Authorization header or presigned query) for ``service``."""
        parts = urllib.parse.urlsplit(target)
        query = dict(urllib.parse.parse_qsl(parts.query, keep_blank_values=True))
        if "X-Amz-Signature" in query:
            fields = self._presigned_fields(query)
            canonical_query = go_query_encode(parts.query, drop=("X-Amz-Signature",))
            payload_hash = query.get("X-Amz-Content-Sha256") or hashlib.sha256(body).hexdigest()  # v4.go buildBodyDigest: UNSIGNED only for s3
        else:
            fields = self._header_fields(headers)
            canonical_query = go_query_encode(parts.query)
            payload_hash = headers.get("x-amz-content-sha256") or hashlib.sha256(body).hexdigest()
        credential, amz_date, signed, given = fields
        access_key, date, region, signed_service = self._scope(credential, amz_date, service, now)
        if "host" not in signed:
            raise SignatureError("SignatureDoesNotMatch", "the host header must be signed")
        request = canonical_request(method, parts.path, canonical_query, headers, signed, payload_hash)
        return self._check(access_key, date, region, signed_service, amz_date, request, given)

    @staticmethod
    def _header_fields(headers: Mapping[str, str]) -> tuple[str, str, list[str], str]:
        auth = headers.get("authorization", "")
        if not auth.startswith(ALGORITHM + " "):
            raise SignatureError("IncompleteSignatureException", "a SigV4 Authorization header (or a presigned URL) is required")
        items = dict(item.strip().partition("=")[::2] for item in auth[len(ALGORITHM) + 1 :].split(","))
        if not {"Credential", "SignedHeaders", "Signature"} <= items.keys() or not headers.get("x-amz-date"):
            raise SignatureError("IncompleteSignatureException", "Authorization needs Credential, SignedHeaders, Signature and an X-Amz-Date header")
        return items["Credential"], headers["x-amz-date"], items["SignedHeaders"].split(";"), items["Signature"]

    @staticmethod
    def _presigned_fields(query: Mapping[str, str]) -> tuple[str, str, list[str], str]:
        needed = ("X-Amz-Algorithm", "X-Amz-Credential", "X-Amz-Date", "X-Amz-SignedHeaders", "X-Amz-Expires")
        missing = [name for name in needed if name not in query]
        if missing or query["X-Amz-Algorithm"] != ALGORITHM:
            raise SignatureError("AuthorizationQueryParametersError", f"presigned URL lacks {', '.join(missing) or 'a SigV4 algorithm'}")
        amz_date = query["X-Amz-Date"]
        expires = datetime.timedelta(seconds=int(query["X-Amz-Expires"]))
        if _parse_date(amz_date) + expires < datetime.datetime.now(datetime.timezone.utc):
            raise SignatureError("AccessDenied", "the presigned URL has expired")
        return query["X-Amz-Credential"], amz_date, query["X-Amz-SignedHeaders"].split(";"), query["X-Amz-Signature"]

    @staticmethod
    def _scope(credential: str, amz_date: str, service: str, now: datetime.datetime | None) -> tuple[str, str, str, str]:
        pieces = credential.split("/")
        if len(pieces) != 5 or pieces[4] != "aws4_request":
            raise SignatureError("IncompleteSignatureException", f"malformed credential scope {'/'.join(pieces[1:])!r}")
        access_key, date, region, signed_service, _ = pieces
        if signed_service != service:
            raise SignatureError("InvalidSignatureException", f"signed for service {signed_service!r}, expected {service!r}")
        when = _parse_date(amz_date)
        if date != amz_date[:8]:
            raise SignatureError("SignatureDoesNotMatch", "the credential scope date is not the X-Amz-Date day")
        if now is not None and abs(now - when) > MAX_SKEW:
            raise SignatureError("InvalidSignatureException", "Signature expired: X-Amz-Date is more than 15 minutes from now")
        return access_key, date, region, signed_service

    def _check(self, access_key: str, date: str, region: str, service: str, amz_date: str, request: str, given: str) -> SignedBy:
        secret = self.credentials.get(access_key)
        if secret is None:
            if not self.accept_unknown_keys:
                raise SignatureError("InvalidClientTokenId", f"the security token included in the request is invalid (unknown access key {access_key})")
            if access_key not in self._warned:
                self._warned.add(access_key)
                log.warning("SigV4: access key %s is not known to the stand-in; its signature's HMAC is not checked", access_key)
            return SignedBy(access_key, region, service, False)
        expected = signature(secret, date, region, service, amz_date, request)
        if not hmac.compare_digest(expected, given):
            log.info("SigV4 mismatch for access key %s", access_key)
            raise SignatureError("SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided")
        return SignedBy(access_key, region, service, True)


def _parse_date(amz_date: str) -> datetime.datetime:
    try:
        return datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.timezone.utc)
    except ValueError:
        raise SignatureError("IncompleteSignatureException", f"X-Amz-Date {amz_date!r} is not YYYYMMDDTHHMMSSZ") from None
