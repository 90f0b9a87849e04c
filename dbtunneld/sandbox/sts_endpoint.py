"""Which STS endpoint Vault's aws auth replays a login to, and what that endpoint accepts.

Vault's side (hashicorp/vault, builtin/credential/aws):

- path_config_client.go: ``sts_endpoint`` (default ``https://sts.amazonaws.com``),
  ``sts_region`` (the region Vault signs its own STS calls for) and
  ``use_sts_region_from_client``.
- path_login.go ``pathLoginUpdateIam``: the endpoint is ``sts_endpoint``, or with
  ``use_sts_region_from_client`` the regional endpoint of the region in the client's
  Authorization credential scope (``awsRegionFromHeader``, error "region missing from
  Authorization header"; ``stsRegionalEndpoint`` -> ``https://sts.<region>.amazonaws.com``).
- ``submitCallerIdentityRequest`` / ``buildHttpRequest``: POST ``endpoint + "/" + RequestURI``
  with ``Host`` = the host of the client's ``iam_request_url``: the signed Host is never
  changed, so the client must sign for a host the endpoint answers to (its comment: "client
  wants to go to a specific region, in which case Vault must be configured with that endpoint
  as well"; a proxy given as ``sts_endpoint`` stays transparent to clients).

AWS's side, which moto does not model (moto serves any host and any region and only checks the
signature against the request it gets, with the region named in the credential scope):

- One STS endpoint serves one region: ``sts.amazonaws.com`` us-east-1, ``sts.<r>.amazonaws.com``
  (``.com.cn`` in China) and a VPC interface endpoint ``vpce-….sts.<r>.vpce.amazonaws.com``
  region ``r``. Any other host is a proxy in front of the STS of Vault's ``sts_region``.
- A request whose credential scope names another region is refused with 403
  ``SignatureDoesNotMatch`` "Credential should be scoped to a valid region." (what STS answers).
- The signed Host must be a name of that endpoint: the endpoint's own host,
  ``sts.<r>.amazonaws.com`` (the name a VPC endpoint with private DNS takes over), or
  ``sts.amazonaws.com`` for us-east-1. AWS does not document its answer to a foreign Host on
  a regional endpoint; refusing it is the strict choice.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

GLOBAL_ENDPOINT = "https://sts.amazonaws.com"
GLOBAL_REGION = "us-east-1"
_AWS_HOST = re.compile(r"^sts(?:\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d))?\.amazonaws\.com(?:\.cn)?$")
_VPCE_HOST = re.compile(r"^vpce-[a-z0-9-]+\.sts\.(?P<region>[a-z]{2}(?:-[a-z]+)+-\d)\.vpce\.amazonaws\.com(?:\.cn)?$")
_SCOPE = re.compile(r"Credential=[^/,\s]+/\d{8}/(?P<region>[^/,\s]+)/(?P<service>[^/,\s]+)/aws4_request")


class StsRefusal(Exception):
    """What the STS endpoint answers (status and body) instead of an identity."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status = status
        self.body = (f'<ErrorResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/"><Error><Type>Sender</Type>'
                     f"<Code>{code}</Code><Message>{message}</Message></Error></ErrorResponse>")
        super().__init__(f"received error code {status} from STS: {self.body}")


@dataclass(frozen=True)
class StsTarget:
    """The endpoint Vault sends the signed request to, and the region it serves."""

    endpoint: str
    region: str

    @property
    def host(self) -> str:
        return (urlsplit(self.endpoint).hostname or "").lower()

    def names(self) -> set[str]:
        """The Host values this endpoint answers to."""
        names = {self.host, f"sts.{self.region}.amazonaws.com", f"sts.{self.region}.amazonaws.com.cn"}
        if self.region == GLOBAL_REGION:
            names.add("sts.amazonaws.com")
        return names


def scope_region(authorization: str) -> str:
    """The region of a SigV4 Authorization header's credential scope ("" when absent)."""
    match = _SCOPE.search(authorization or "")
    return match.group("region") if match else ""


def regional_endpoint(region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://sts.{region}.{suffix}"


def endpoint_region(endpoint: str, configured_region: str) -> str:
    """The region an endpoint serves: from an AWS host name, else (a proxy) Vault's sts_region."""
    host = (urlsplit(endpoint).hostname or "").lower()
    for pattern in (_AWS_HOST, _VPCE_HOST):
        match = pattern.match(host)
        if match:
            return match.group("region") or GLOBAL_REGION
    return configured_region or GLOBAL_REGION


def vault_target(sts_endpoint: str, sts_region: str, use_sts_region_from_client: bool,
                 authorization: str) -> StsTarget:
    """The endpoint ``pathLoginUpdateIam`` picks. ValueError: Vault's own refusal."""
    if use_sts_region_from_client:
        region = scope_region(authorization)
        if not region:
            raise ValueError("region missing from Authorization header")
        return StsTarget(regional_endpoint(region), region)
    endpoint = (sts_endpoint or GLOBAL_ENDPOINT).rstrip("/")
    return StsTarget(endpoint, endpoint_region(endpoint, sts_region))


def check_accepts(target: StsTarget, signed_host: str, authorization: str) -> None:
    """Refuse (``StsRefusal``) what the endpoint behind ``target`` would not take."""
    region = scope_region(authorization)
    if region != target.region:
        raise StsRefusal(403, "SignatureDoesNotMatch",
                         f"Credential should be scoped to a valid region. (endpoint {target.endpoint} "
                         f"serves {target.region}; the request was signed for {region or 'no region'})")
    if (signed_host or "").lower() not in target.names():
        raise StsRefusal(403, "SignatureDoesNotMatch",
                         f"The request signature we calculated does not match the signature you provided. "
                         f"(Host {signed_host!r} is not a name of {target.endpoint})")
