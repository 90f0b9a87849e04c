"""The SSM stand-in's managed-node inventory: ``AmazonSSM.DescribeInstanceInformation``.

moto does not implement the call, so the stand-in answers it from its own table of the nodes
whose agent registered. The shape follows the SSM API reference ("DescribeInstanceInformation",
"InstanceInformation", "InstanceInformationStringFilter") as botocore carries it in
boto/botocore ``botocore/data/ssm/2014-11-06/service-2.json`` (operation
``DescribeInstanceInformation``, shapes ``DescribeInstanceInformationRequest``,
``InstanceInformationStringFilter``, ``InstanceInformation``, ``PingStatus``) and its paginator
(``paginators-1.json``: ``NextToken`` in and out, ``MaxResults`` as the limit):

* the answer is ``InstanceInformationList`` (``InstanceId``, ``PingStatus`` Online /
  ConnectionLost / Inactive, ``LastPingDateTime``, ``AgentVersion``, ``PlatformType``,
  ``ResourceType`` EC2Instance, ``SourceId``/``SourceType``...) and ``NextToken`` while more
  remain; ``MaxResults`` is 5 to 50, 10 by default; a token that is not ours is
  ``InvalidNextToken``;
* ``Filters`` keys: ``InstanceIds``, ``PingStatus``, ``PlatformTypes``, ``ResourceType``,
  ``AgentVersion``, ``tag-key``, ``tag:<key>``; tag filters cannot be combined with other filter
  types; an unknown key is ``InvalidFilterKey``; 1 to 100 values each; the legacy
  ``InstanceInformationFilterList`` (``key``/``valueSet``) is accepted alone, never together with
  ``Filters`` ("leads to an exception error");
* "If you specify a node ID that isn't valid or a node that you don't own, you receive an
  error": an ``InstanceIds`` value that is no registered node is ``InvalidInstanceId``, a
  malformed one ``InvalidInstanceInformationFilterValue``. A client asking about an instance
  without an agent must be ready for that error (``dbtunneld.adapters.inventory`` asks per instance).

Who is registered: the sandbox's seeded bastion (moto seed file: ``bastion_instance_id``,
``bastion_tags``), Online. Tests change it with ``POST /_standin/instances``
``{"instance_id": "i-...", "ping_status": "ConnectionLost", "tags": {...}}`` (``ping_status``
"" deregisters it: its agent is gone); ``GET /_standin/instances`` lists the table.
"""

from __future__ import annotations

import base64
import binascii
import datetime
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PING_STATUSES = ("Online", "ConnectionLost", "Inactive")
INSTANCE_ID = re.compile(r"(^i-(\w{8}|\w{17})$)|(^mi-\w{17}$)")     # the InstanceId shape's pattern
PLAIN_KEYS = {"InstanceIds": "InstanceId", "PingStatus": "PingStatus", "PlatformTypes": "PlatformType",
              "ResourceType": "ResourceType", "AgentVersion": "AgentVersion", "AssociationStatus": "AssociationStatus",
              "SourceIds": "SourceId", "SourceTypes": "SourceType"}
DEFAULT_MAX_RESULTS = 10
AGENT_VERSION = "3.3.1142.0"


class InventoryError(Exception):
    """An SSM API error: ``code`` is the exception shape's name."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code, self.message = code, message


@dataclass
class ManagedNode:
    instance_id: str
    ping_status: str = "Online"
    tags: dict[str, str] = field(default_factory=dict)
    last_ping: float = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).timestamp())

    def information(self) -> dict[str, Any]:
        """One ``InstanceInformation`` (epoch seconds: the JSON 1.1 protocol's timestamps)."""
        return {"InstanceId": self.instance_id, "PingStatus": self.ping_status, "LastPingDateTime": self.last_ping,
                "AgentVersion": AGENT_VERSION, "IsLatestVersion": True, "PlatformType": "Linux",
                "PlatformName": "Amazon Linux", "PlatformVersion": "2023", "ResourceType": "EC2Instance",
                "IPAddress": "10.0.1.10", "ComputerName": f"{self.instance_id}.ec2.internal",
                "AssociationStatus": "Success", "SourceId": self.instance_id, "SourceType": "AWS::EC2::Instance"}

    def field(self, name: str) -> str:
        return str(self.information().get(name, ""))


class ManagedInstances:
    """The registered nodes: the seed file's bastion (read at each call: moto may reseed) plus test overrides."""

    def __init__(self, seed_file: str | None = None) -> None:
        self.seed_file = seed_file
        self.overrides: dict[str, ManagedNode | None] = {}     # None: deregistered

    def nodes(self) -> list[ManagedNode]:
        table = {n.instance_id: n for n in self._seeded()}
        for instance_id, node in self.overrides.items():
            if node is None:
                table.pop(instance_id, None)
            else:
                table[instance_id] = node
        return sorted(table.values(), key=lambda n: n.instance_id)

    def _seeded(self) -> list[ManagedNode]:
        if not self.seed_file:
            return []
        try:
            seed = json.loads(Path(self.seed_file).read_text())
        except (OSError, ValueError):
            return []
        bastion = seed.get("bastion_instance_id")
        return [ManagedNode(bastion, "Online", dict(seed.get("bastion_tags") or {}))] if bastion else []

    def set_status(self, body: dict[str, Any]) -> dict[str, Any]:
        """The control knob: register a node with a ping status, change it, or deregister it ("")."""
        instance_id = str(body.get("instance_id") or "")
        status = str(body.get("ping_status") if body.get("ping_status") is not None else "Online")
        if not INSTANCE_ID.match(instance_id):
            raise ValueError(f"instances: instance_id {instance_id!r} is not an instance id (i-...)")
        if status and status not in PING_STATUSES:
            raise ValueError(f"instances: ping_status must be one of {', '.join(PING_STATUSES)} or \"\"")
        known = {n.instance_id: n for n in self.nodes()}.get(instance_id)
        tags = dict(body.get("tags") or (known.tags if known else {}))
        self.overrides[instance_id] = ManagedNode(instance_id, status, tags) if status else None
        return self.listing()

    def listing(self) -> dict[str, Any]:
        return {"instances": [{"instance_id": n.instance_id, "ping_status": n.ping_status, "tags": n.tags}
                              for n in self.nodes()]}

    # -- the API call

    def describe(self, body: dict[str, Any]) -> dict[str, Any]:
        """``DescribeInstanceInformation``: the filtered list, one page of it."""
        matches = self._matching(_filters(body))
        limit = _max_results(body)
        start = _offset(body.get("NextToken"), len(matches))
        page = matches[start:start + limit]
        out: dict[str, Any] = {"InstanceInformationList": [n.information() for n in page]}
        if start + limit < len(matches):
            out["NextToken"] = _token(start + limit)
        return out

    def _matching(self, filters: list[tuple[str, list[str]]]) -> list[ManagedNode]:
        nodes = self.nodes()
        registered = {n.instance_id for n in nodes}
        for key, values in filters:
            if key == "InstanceIds":
                _check_instance_ids(values, registered)
            nodes = [n for n in nodes if _passes(n, key, values)]
        return nodes


def _filters(body: dict[str, Any]) -> list[tuple[str, list[str]]]:
    legacy, current = body.get("InstanceInformationFilterList"), body.get("Filters")
    if legacy and current:
        raise InventoryError("ValidationException", "InstanceInformationFilterList and Filters cannot be used together; use Filters")
    pairs = [(f.get("key"), f.get("valueSet")) for f in legacy] if legacy else \
            [(f.get("Key"), f.get("Values")) for f in current or []]
    checked = [_filter(key, values, legacy=bool(legacy)) for key, values in pairs]
    kinds = {key.startswith("tag") for key, _ in checked}
    if len(kinds) > 1:
        raise InventoryError("InvalidFilterKey", "tag filters can't be combined with other filter types")
    return checked


def _filter(key: Any, values: Any, *, legacy: bool) -> tuple[str, list[str]]:
    if not isinstance(key, str) or not key:
        raise InventoryError("ValidationException", "a filter needs a Key")
    tag_key = key == "tag-key" or key.startswith("tag:")
    if key not in PLAIN_KEYS and not (tag_key and not legacy and len(key) > 4):
        raise InventoryError("InvalidFilterKey", f"the filter key {key!r} isn't valid")
    if not isinstance(values, list) or not 1 <= len(values) <= 100 or not all(isinstance(v, str) and v for v in values):
        raise InventoryError("InvalidInstanceInformationFilterValue",
                             f"filter {key}: 1 to 100 non-empty string values are required")
    if key == "PingStatus" and set(values) - set(PING_STATUSES):
        raise InventoryError("InvalidInstanceInformationFilterValue", f"PingStatus values are {', '.join(PING_STATUSES)}")
    return key, values


def _check_instance_ids(values: list[str], registered: set[str]) -> None:
    malformed = [v for v in values if not INSTANCE_ID.match(v)]
    if malformed:
        raise InventoryError("InvalidInstanceInformationFilterValue", f"not instance ids: {', '.join(malformed)}")
    unknown = [v for v in values if v not in registered]
    if unknown:
        raise InventoryError("InvalidInstanceId", f"Instance ids not valid or not managed: {', '.join(unknown)}")


def _passes(node: ManagedNode, key: str, values: list[str]) -> bool:
    if key == "tag-key":
        return any(v in node.tags for v in values)
    if key.startswith("tag:"):
        return node.tags.get(key[4:]) in values
    return node.field(PLAIN_KEYS[key]) in values


def _max_results(body: dict[str, Any]) -> int:
    value = body.get("MaxResults", DEFAULT_MAX_RESULTS)
    if not isinstance(value, int) or not 5 <= value <= 50:
        raise InventoryError("ValidationException", "1 validation error detected: Value at 'maxResults' failed to "
                                                    "satisfy constraint: Member must have value between 5 and 50")
    return value


TOKEN_PREFIX = "ssm-standin-inventory:"


def _token(offset: int) -> str:
    return base64.b64encode(f"{TOKEN_PREFIX}{offset}".encode()).decode()


def _offset(token: Any, total: int) -> int:
    if token in (None, ""):
        return 0
    try:
        text = base64.b64decode(str(token), validate=True).decode()
    except (binascii.Error, UnicodeDecodeError):
        text = ""
    number = text[len(TOKEN_PREFIX):] if text.startswith(TOKEN_PREFIX) else ""
    if not number.isdigit() or int(number) > total:
        raise InventoryError("InvalidNextToken", "The specified token isn't valid.")
    return int(number)

