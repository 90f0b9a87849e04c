"""What exists for this developer in AWS: profiles, Aurora MySQL clusters, bastion candidates.

Read-only lookups for ``dbtunneld init`` and the RDS-tag catalog: the profiles of the AWS config
file, RDS ``DescribeDBClusters`` (writer and reader endpoints, port, tags) and the bastion by its
EC2 tags, checked against SSM ``DescribeInstanceInformation`` (agent ping status) when SSM answers
that call. AWS errors go through ``discovery.classify_aws_error``; nothing is retried here.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import botocore.session

from .discovery import classify_aws_error

log = logging.getLogger(__name__)

AURORA_MYSQL_ENGINES = ("aurora-mysql", "aurora")     # "aurora" is Aurora MySQL 5.6
BASTION_ROLE_TAG = ("dbtunneld:role", "bastion")
PORT_TAG = "dbtunneld:port"
ROLE_TAG = "dbtunneld:role"


def aws_profiles() -> list[str]:
    """Profile names of the AWS config file (``AWS_CONFIG_FILE`` or ``~/.aws/config``), sorted."""
    return sorted(botocore.session.Session().available_profiles)


def profile_region(profile: str) -> str:
    """The ``region`` of ``profile`` in the AWS config file ("" when it has none)."""
    session = botocore.session.Session(profile=profile)
    return session.get_config_variable("region") or ""


@dataclass(frozen=True)
class AuroraCluster:
    """One Aurora MySQL cluster as RDS describes it."""

    identifier: str
    endpoint: str
    reader_endpoint: str
    port: int
    database: str = ""
    status: str = ""
    tags: dict[str, str] = field(default_factory=dict)

    def tag_port(self) -> int | None:
        """The team's local port for it (tag ``dbtunneld:port``), when the tag is a valid port."""
        text = self.tags.get(PORT_TAG, "").strip()
        return int(text) if text.isdigit() and 1024 <= int(text) <= 65535 else None

    @property
    def tag_role(self) -> str:
        return self.tags.get(ROLE_TAG, "").strip()


def aurora_clusters(rds: Any) -> list[AuroraCluster]:
    """Every Aurora MySQL cluster of the region, sorted by name (RDS DescribeDBClusters)."""
    try:
        pages = rds.get_paginator("describe_db_clusters").paginate()
        raw = [c for page in pages for c in page.get("DBClusters", [])]
    except Exception as exc:
        raise classify_aws_error(exc, "RDS DescribeDBClusters (cluster discovery)") from None
    found = [_cluster(c) for c in raw if c.get("Engine", "") in AURORA_MYSQL_ENGINES and c.get("Endpoint")]
    return sorted(found, key=lambda c: c.identifier)


def _cluster(c: dict[str, Any]) -> AuroraCluster:
    return AuroraCluster(identifier=c["DBClusterIdentifier"], endpoint=c["Endpoint"],
                         reader_endpoint=c.get("ReaderEndpoint", "") or "", port=int(c.get("Port") or 3306),
                         database=c.get("DatabaseName", "") or "", status=c.get("Status", ""),
                         tags={t["Key"]: t["Value"] for t in c.get("TagList", [])})


@dataclass(frozen=True)
class BastionCandidate:
    """A running EC2 instance tagged as a bastion, with what SSM says of its agent."""

    instance_id: str
    name: str
    tags: dict[str, str]
    ping_status: str = ""            # SSM PingStatus ("Online", "ConnectionLost"...); "" = unknown


@dataclass(frozen=True)
class BastionSearch:
    candidates: list[BastionCandidate]           # what to offer: the Online ones when SSM answered
    ssm_note: str = ""               # why SSM's agent status is unknown, when it is
    skipped: list[BastionCandidate] = field(default_factory=list)   # tagged, but their agent is not Online


def bastion_candidates(ec2: Any, ssm: Any) -> BastionSearch:
    """Running instances tagged ``dbtunneld:role=bastion`` or named "*bastion*"; with SSM's answer,
    only those whose agent is Online (SSM DescribeInstanceInformation), unless none is."""
    instances = [i for i in _running_instances(ec2) if _looks_like_bastion(i)]
    candidates = [BastionCandidate(i["InstanceId"], _tags(i).get("Name", ""), _tags(i)) for i in instances]
    if not candidates:
        return BastionSearch([])
    try:
        pings = {c.instance_id: _ping_status(ssm, c.instance_id) for c in candidates}
    except Exception as exc:
        code = (getattr(exc, "response", None) or {}).get("Error", {}).get("Code", "") or type(exc).__name__
        note = f"SSM DescribeInstanceInformation failed ({code}); the bastion is chosen by its EC2 tags only"
        log.info("%s", note)
        return BastionSearch(candidates, note)
    known = sorted((BastionCandidate(c.instance_id, c.name, c.tags, pings[c.instance_id]) for c in candidates),
                   key=lambda c: (c.ping_status != "Online", c.instance_id))
    online = [c for c in known if c.ping_status == "Online"]
    if not online:
        return BastionSearch(known, "SSM: no bastion candidate's agent is Online; sessions will fail until one is")
    return BastionSearch(online, skipped=[c for c in known if c.ping_status != "Online"])


def _running_instances(ec2: Any) -> list[dict[str, Any]]:
    try:
        pages = ec2.get_paginator("describe_instances").paginate(
            Filters=[{"Name": "instance-state-name", "Values": ["running"]}])
        return [i for page in pages for r in page.get("Reservations", []) for i in r.get("Instances", [])]
    except Exception as exc:
        raise classify_aws_error(exc, "EC2 DescribeInstances (bastion discovery)") from None


def _tags(instance: dict[str, Any]) -> dict[str, str]:
    return {t["Key"]: t["Value"] for t in instance.get("Tags", [])}


def _looks_like_bastion(instance: dict[str, Any]) -> bool:
    tags = _tags(instance)
    key, value = BASTION_ROLE_TAG
    return tags.get(key) == value or "bastion" in tags.get("Name", "").lower()


def _ping_status(ssm: Any, instance_id: str) -> str:
    """The agent's PingStatus, or "not registered": SSM answers InvalidInstanceId for an instance
    id that is no managed node (so each candidate is asked on its own)."""
    try:
        pages = ssm.get_paginator("describe_instance_information").paginate(
            Filters=[{"Key": "InstanceIds", "Values": [instance_id]}])
        found = [i for page in pages for i in page.get("InstanceInformationList", [])]
    except Exception as exc:
        if (getattr(exc, "response", None) or {}).get("Error", {}).get("Code") == "InvalidInstanceId":
            return "not registered"
        raise
    return next((i.get("PingStatus", "") for i in found if i.get("InstanceId") == instance_id), "not registered")
