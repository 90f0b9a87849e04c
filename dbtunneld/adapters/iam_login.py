"""The signed ``sts:GetCallerIdentity`` request that Vault's aws auth method forwards to STS.

Vault's IAM login (hashicorp/vault builtin/credential/aws/path_login.go, ``pathLoginUpdateIam``)
does not see AWS credentials: it receives a request the client signed, replays it to *its*
STS endpoint (``buildHttpRequest``: its ``sts_endpoint`` with the client's Host) and trusts the
identity STS answers. AWS verifies the signature there, so the request must be signed for the
region and host of the endpoint Vault uses: the global ``sts.amazonaws.com`` (us-east-1) by
default, ``sts.<region>.amazonaws.com`` when Vault is set up with a regional ``sts_endpoint`` /
``sts_region``, or a VPC endpoint's name.

The payload mirrors the Vault CLI (builtin/credential/aws/cli.go ``GenerateLoginData``: the
region's STS endpoint, signing region forced to that region by ``stsSigningResolver``; the
server-id header added before signing): method, URL, body and headers (JSON of lists), each
base64. hvac's ``iam_login`` cannot be used: it always signs the global host.
"""

from __future__ import annotations

import base64
import json
from typing import Any, Callable
from urllib.parse import urlsplit

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from ..core.config import VaultConfig

STS_BODY = "Action=GetCallerIdentity&Version=2011-06-15"
SERVER_ID_HEADER = "X-Vault-AWS-IAM-Server-ID"
DEFAULT_REGION = "us-east-1"


def sts_url(region: str, endpoint: str = "") -> str:
    """The URL to sign: ``endpoint`` when set, else the region's STS endpoint as the Vault CLI
    resolves it (us-east-1 -> the global ``sts.amazonaws.com``)."""
    if endpoint:
        return endpoint.rstrip("/") + "/"
    if region == DEFAULT_REGION:
        return "https://sts.amazonaws.com/"
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://sts.{region}.{suffix}/"


def signing_region(config: VaultConfig, profile_region: Callable[[], str]) -> str:
    """``vault.sts_region``, or for ``auto`` the AWS profile's region (asked only then)."""
    if config.sts_region != "auto":
        return config.sts_region
    return profile_region() or DEFAULT_REGION


def _b64(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def login_payload(access_key: str, secret_key: str, session_token: str | None, *, region: str,
                  endpoint: str = "", server_id: str = "", role: str = "") -> dict[str, Any]:
    """The body of ``POST auth/<mount>/login``: a GetCallerIdentity signed (SigV4, botocore)
    for ``region`` at ``sts_url(region, endpoint)``; ``server_id`` goes inside SignedHeaders."""
    url = sts_url(region, endpoint)
    headers = {"Host": urlsplit(url).netloc,
               "Content-Type": "application/x-www-form-urlencoded; charset=utf-8"}
    if server_id:
        headers[SERVER_ID_HEADER] = server_id
    request = AWSRequest(method="POST", url=url, data=STS_BODY, headers=headers)
    SigV4Auth(Credentials(access_key, secret_key, session_token), "sts", region).add_auth(request)
    signed = {k: [v] for k, v in request.headers.items()}
    payload = {"iam_http_request_method": "POST", "iam_request_url": _b64(url),
               "iam_request_body": _b64(STS_BODY), "iam_request_headers": _b64(json.dumps(signed))}
    if role:
        payload["role"] = role
    return payload

