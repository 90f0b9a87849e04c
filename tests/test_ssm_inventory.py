"""The SSM stand-in's DescribeInstanceInformation (sandbox/ssm_inventory.py), called with boto3
against the stack's stand-in as a developer's role would call it."""

from __future__ import annotations

import json
import urllib.request

import boto3
import pytest
from botocore.exceptions import ClientError


def set_ping(stack, instance_id: str, status: str) -> dict:
    req = urllib.request.Request(f"{stack.ssm_endpoint}/_standin/instances", method="POST",
                                 data=json.dumps({"instance_id": instance_id, "ping_status": status}).encode())
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


@pytest.fixture
def ssm(stack):
    client = boto3.client("ssm", endpoint_url=stack.ssm_endpoint, region_name=stack.region,
                          **stack.role_credentials("db-developer"))
    yield client
    seed = json.loads(stack.seed_file.read_text())
    set_ping(stack, seed["bastion_instance_id"], "Online")
    set_ping(stack, seed["standby_instance_id"], "")


def _ids(answer: dict) -> dict[str, str]:
    return {i["InstanceId"]: i["PingStatus"] for i in answer["InstanceInformationList"]}


def test_seeded_bastion_is_online_and_a_knob_marks_connection_lost(stack, ssm):
    seed = json.loads(stack.seed_file.read_text())
    bastion, standby = seed["bastion_instance_id"], seed["standby_instance_id"]
    assert _ids(ssm.describe_instance_information()) == {bastion: "Online"}
    with pytest.raises(ClientError) as err:                # no agent on the standby: not a managed node
        ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [standby]}])
    assert err.value.response["Error"]["Code"] == "InvalidInstanceId"
    set_ping(stack, standby, "ConnectionLost")
    answer = ssm.describe_instance_information(Filters=[{"Key": "InstanceIds", "Values": [standby]}])
    assert _ids(answer) == {standby: "ConnectionLost"}
    info = answer["InstanceInformationList"][0]
    assert info["ResourceType"] == "EC2Instance" and info["PlatformType"] == "Linux"
    online = ssm.describe_instance_information(Filters=[{"Key": "PingStatus", "Values": ["Online"]}])
    assert _ids(online) == {bastion: "Online"}
    tagged = ssm.describe_instance_information(Filters=[{"Key": "tag:dbtunneld:role", "Values": ["bastion"]}])
    assert _ids(tagged) == {bastion: "Online"}


def test_filters_and_pages_are_checked_like_the_real_api(stack, ssm):
    seed = json.loads(stack.seed_file.read_text())
    set_ping(stack, seed["standby_instance_id"], "ConnectionLost")
    for i in range(6):
        set_ping(stack, f"i-{i:017x}", "Online")
    try:
        pages = list(ssm.get_paginator("describe_instance_information").paginate(PaginationConfig={"PageSize": 5}))
        assert [len(p["InstanceInformationList"]) for p in pages] == [5, 3]
        assert "NextToken" in pages[0] and "NextToken" not in pages[1]
        cases = [
            (dict(Filters=[{"Key": "Color", "Values": ["x"]}]), "InvalidFilterKey"),
            (dict(Filters=[{"Key": "tag-key", "Values": ["Name"]}, {"Key": "PingStatus", "Values": ["Online"]}]),
             "InvalidFilterKey"),
            (dict(Filters=[{"Key": "InstanceIds", "Values": ["bastion"]}]), "InvalidInstanceInformationFilterValue"),
            (dict(Filters=[{"Key": "PingStatus", "Values": ["Up"]}]), "InvalidInstanceInformationFilterValue"),
            (dict(NextToken="not-a-token"), "InvalidNextToken"),
            (dict(InstanceInformationFilterList=[{"key": "PingStatus", "valueSet": ["Online"]}],
                  Filters=[{"Key": "PingStatus", "Values": ["Online"]}]), "ValidationException"),
        ]
        for kwargs, code in cases:
            with pytest.raises(ClientError) as err:
                ssm.describe_instance_information(**kwargs)
            assert err.value.response["Error"]["Code"] == code, kwargs
        legacy = ssm.describe_instance_information(
            InstanceInformationFilterList=[{"key": "PingStatus", "valueSet": ["ConnectionLost"]}])
        assert _ids(legacy) == {seed["standby_instance_id"]: "ConnectionLost"}
    finally:
        for i in range(6):
            set_ping(stack, f"i-{i:017x}", "")
