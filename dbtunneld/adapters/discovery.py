"""Which EC2 instance is the bastion: a configured instance id, or tag filters.

Asks EC2 DescribeInstances for running instances only and picks deterministically (the longest
running one, then the lowest instance id), so every daemon of a team lands on the same bastion
and a replacement is picked up on the next connect. AWS errors are classified here into
``dbtunneld.core.errors`` (``classify_aws_error``); nothing is retried here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from ..core.errors import (DbtunneldError, NeedsUserError, PermissionDeniedError, SignInNeededError,
                     TransientError)

log = logging.getLogger(__name__)

_SIGN_IN_CODES = {"ExpiredToken", "ExpiredTokenException", "RequestExpired", "InvalidClientTokenId",
                  "UnrecognizedClientException", "AuthFailure", "UnauthorizedException"}
_DENIED_CODES = {"AccessDenied", "AccessDeniedException", "UnauthorizedOperation"}
_SIGN_IN_EXCEPTIONS = {"SSOTokenLoadError", "TokenRetrievalError", "UnauthorizedSSOTokenError",
                       "NoCredentialsError", "CredentialRetrievalError"}


class BastionNotFoundError(TransientError):
    """No running instance matches: retried with backoff (an ASG may be replacing the bastion)."""


@dataclass(frozen=True)
class Bastion:
    instance_id: str
    private_ip: str = ""
    public_ip: str = ""
    availability_zone: str = ""
    name: str = ""


def find_bastion(ec2: Any, *, instance_id: str = "", tags: Mapping[str, str] | None = None) -> Bastion:
    """The running bastion named by ``instance_id`` or matching every tag in ``tags``."""
    if not instance_id and not tags:
        raise NeedsUserError("no bastion is configured",
                             hint="set bastion.instance_id or bastion.tags in config.toml")
    filters = [{"Name": "instance-state-name", "Values": ["running"]}]
    kwargs: dict[str, Any] = {"Filters": filters}
    if instance_id:
        kwargs["InstanceIds"] = [instance_id]
    for key, value in sorted((tags or {}).items()):
        filters.append({"Name": f"tag:{key}", "Values": [value]})
    instances = _describe(ec2, kwargs, instance_id)
    if not instances:
        raise _not_found(ec2, instance_id, tags or {})
    chosen = sorted(instances, key=_seniority)[0]
    if len(instances) > 1:
        log.info("bastion: %d running instances match; using %s (longest running)",
                 len(instances), chosen["InstanceId"])
    return _bastion(chosen)


def _describe(ec2: Any, kwargs: dict[str, Any], instance_id: str) -> list[dict[str, Any]]:
    try:
        pages = ec2.get_paginator("describe_instances").paginate(**kwargs)
        return [i for page in pages for r in page.get("Reservations", []) for i in r.get("Instances", [])]
    except Exception as exc:
        if instance_id and _error_code(exc) == "InvalidInstanceID.NotFound":
            return []
        raise classify_aws_error(exc, "EC2 DescribeInstances (bastion lookup)") from None


def _seniority(instance: dict[str, Any]) -> tuple[datetime, str]:
    launched = instance.get("LaunchTime") or datetime.max.replace(tzinfo=timezone.utc)
    if isinstance(launched, str):
        launched = datetime.fromisoformat(launched.replace("Z", "+00:00"))
    return launched, instance["InstanceId"]


def _bastion(instance: dict[str, Any]) -> Bastion:
    tags = {t["Key"]: t["Value"] for t in instance.get("Tags", [])}
    return Bastion(instance_id=instance["InstanceId"],
                   private_ip=instance.get("PrivateIpAddress", "") or "",
                   public_ip=instance.get("PublicIpAddress", "") or "",
                   availability_zone=instance.get("Placement", {}).get("AvailabilityZone", ""),
                   name=tags.get("Name", ""))


def _not_found(ec2: Any, instance_id: str, tags: Mapping[str, str]) -> BastionNotFoundError:
    region = getattr(getattr(ec2, "meta", None), "region_name", "") or "the configured region"
    if instance_id:
        return BastionNotFoundError(
            f"bastion {instance_id} is not running in {region}",
            hint="start the instance, or fix bastion.instance_id / aws.region in config.toml")
    wanted = ", ".join(f"{k}={v}" for k, v in sorted(tags.items()))
    return BastionNotFoundError(
        f"no running EC2 instance in {region} has the tags {wanted}",
        hint="check bastion.tags and aws.region in config.toml (dbtunneld keeps looking meanwhile)")


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def classify_aws_error(exc: Exception, doing: str) -> DbtunneldError:
    """Map a botocore error onto what the caller does: sign in, ask for access, or retry."""
    if isinstance(exc, DbtunneldError):
        return exc
    code, name = _error_code(exc), type(exc).__name__
    detail = f"{doing}: {code or name}: {exc}"
    if code in _SIGN_IN_CODES or name in _SIGN_IN_EXCEPTIONS:
        return SignInNeededError(detail)
    if code in _DENIED_CODES:
        return PermissionDeniedError(detail, hint="ask for the IAM permission named above on your SSO role")
    return TransientError(detail, hint="AWS did not answer as expected; dbtunneld retries")
