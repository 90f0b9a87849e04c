"""Bastion discovery through EC2 DescribeInstances (moto), and AWS error classification."""

from __future__ import annotations

import pytest

boto3 = pytest.importorskip("boto3")
moto = pytest.importorskip("moto")
from botocore.exceptions import ClientError, NoCredentialsError  # noqa: E402

from dbtunneld.adapters.discovery import (BastionNotFoundError, classify_aws_error,  # noqa: E402
                                 find_bastion)
from dbtunneld.core.errors import (NeedsUserError, PermissionDeniedError, SignInNeededError,  # noqa: E402
                              TransientError)


@pytest.fixture
def ec2(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    with moto.mock_aws():
        yield boto3.client("ec2", region_name="eu-west-1")


def launch(ec2, name: str, **tags) -> str:
    all_tags = [{"Key": "Name", "Value": name}] + [{"Key": k, "Value": v} for k, v in tags.items()]
    out = ec2.run_instances(ImageId="ami-12345678", MinCount=1, MaxCount=1, InstanceType="t3.micro",
                            TagSpecifications=[{"ResourceType": "instance", "Tags": all_tags}])
    return out["Instances"][0]["InstanceId"]


def test_tags_pick_the_running_bastion(ec2):
    launch(ec2, "web")
    wanted = launch(ec2, "bastion", team="db")
    found = find_bastion(ec2, tags={"Name": "bastion", "team": "db"})
    assert found.instance_id == wanted and found.name == "bastion"
    assert found.private_ip and found.availability_zone.startswith("eu-west-1")


def test_stopped_instances_are_ignored(ec2):
    stopped = launch(ec2, "bastion")
    ec2.stop_instances(InstanceIds=[stopped])
    running = launch(ec2, "bastion")
    assert find_bastion(ec2, tags={"Name": "bastion"}).instance_id == running


def test_choice_among_several_is_deterministic(ec2):
    ids = [launch(ec2, "bastion") for _ in range(4)]
    picks = {find_bastion(ec2, tags={"Name": "bastion"}).instance_id for _ in range(5)}
    assert len(picks) == 1 and picks.pop() in ids


def test_longest_running_wins_then_lowest_id():
    from datetime import datetime, timezone

    from dbtunneld.adapters.discovery import _seniority

    old = {"InstanceId": "i-0000000000000000f", "LaunchTime": datetime(2020, 1, 1, tzinfo=timezone.utc)}
    new_low = {"InstanceId": "i-00000000000000001", "LaunchTime": datetime(2021, 1, 1, tzinfo=timezone.utc)}
    new_high = {"InstanceId": "i-00000000000000002", "LaunchTime": "2021-01-01T00:00:00Z"}
    assert sorted([new_high, new_low, old], key=_seniority) == [old, new_low, new_high]


def test_no_match_is_a_clear_retryable_error(ec2):
    launch(ec2, "web")
    with pytest.raises(BastionNotFoundError) as info:
        find_bastion(ec2, tags={"Name": "bastion"})
    assert "Name=bastion" in str(info.value) and "eu-west-1" in str(info.value)
    assert "bastion.tags" in info.value.hint
    assert isinstance(info.value, TransientError)


def test_instance_id_lookup(ec2):
    wanted = launch(ec2, "bastion")
    assert find_bastion(ec2, instance_id=wanted).instance_id == wanted
    ec2.stop_instances(InstanceIds=[wanted])
    with pytest.raises(BastionNotFoundError) as info:
        find_bastion(ec2, instance_id=wanted)
    assert wanted in str(info.value) and "not running" in str(info.value)


def test_unknown_instance_id(ec2):
    with pytest.raises(BastionNotFoundError) as info:
        find_bastion(ec2, instance_id="i-0123456789abcdef0")
    assert "i-0123456789abcdef0" in str(info.value)


def test_nothing_configured():
    with pytest.raises(NeedsUserError) as info:
        find_bastion(object())
    assert "bastion.instance_id" in info.value.hint


def client_error(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "nope"}}, "DescribeInstances")


@pytest.mark.parametrize("exc, kind", [
    (client_error("ExpiredToken"), SignInNeededError),
    (client_error("UnauthorizedOperation"), PermissionDeniedError),
    (client_error("AccessDenied"), PermissionDeniedError),
    (client_error("RequestLimitExceeded"), TransientError),
    (NoCredentialsError(), SignInNeededError),
    (ConnectionError("reset"), TransientError),
])
def test_aws_errors_are_classified(exc, kind):
    err = classify_aws_error(exc, "EC2 DescribeInstances")
    assert type(err) is kind and "EC2 DescribeInstances" in str(err)


def test_denied_describe_reaches_the_caller_classified():
    class Denied:
        meta = None

        def get_paginator(self, name):
            raise client_error("UnauthorizedOperation")

    with pytest.raises(PermissionDeniedError) as info:
        find_bastion(Denied(), tags={"Name": "bastion"})
    assert "IAM permission" in info.value.hint
