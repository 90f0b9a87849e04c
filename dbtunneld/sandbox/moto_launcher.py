"""Run a moto server for the sandbox: seed it, then switch SigV4 + IAM enforcement on.

    python -m dbtunneld.sandbox.moto_launcher --port PORT --seed-out FILE [--cluster NAME=PORT ...]

Seeds (with moto's default account 123456789012, region us-east-1): an IAM user with an
access key that may assume the roles ``db-developer`` (what the daemon needs: EC2/RDS
lookups, SSM sessions) and ``analyst`` (a role Vault does not bind, for negative tests);
a running EC2 bastion tagged ``Name=dbtunneld-bastion`` (its SSM agent is Online in the SSM
stand-in: ``ssm_inventory``) and a standby ``Name=dbtunneld-bastion-standby`` without the
``dbtunneld:role`` tag and without an agent (tests mark it ConnectionLost); one Aurora MySQL cluster per
``--cluster`` (port = the MariaDB port standing in for it), tagged ``dbtunneld:role=<name>-ro``
(the team's Vault role for it, read by ``dbtunneld init`` and the RDS-tag catalog);
a KMS key for Session Manager's
session encryption (``kms``: the developer role may GenerateDataKey, the user ``ssm-agent``,
standing for the SSM agent's instance role, may Decrypt). Then it sets
``moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 0``: from then on a wrong, tampered or
unknown signature fails (SignatureDoesNotMatch / InvalidClientTokenId) and IAM policies are
enforced. Only then is FILE written (mode 0600, atomically): it holds the seeded ids and
the user's keys, and its existence is the readiness signal.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

ACCOUNT_ID = "123456789012"
USER_NAME = "dev-alice"
DEVELOPER_ROLE = "db-developer"
UNBOUND_ROLE = "analyst"
BASTION_TAGS = {"Name": "dbtunneld-bastion", "dbtunneld:role": "bastion"}
STANDBY_TAGS = {"Name": "dbtunneld-bastion-standby"}


def trust_policy(user_arn: str) -> dict:
    """Who may assume the roles: the seeded user (moto matches principals literally)."""
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Principal": {"AWS": [user_arn, f"arn:aws:iam::{ACCOUNT_ID}:root"]},
         "Action": "sts:AssumeRole"}]}


DEVELOPER_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Resource": "*", "Action": [
        "sts:GetCallerIdentity", "ec2:Describe*", "rds:Describe*", "ssm:StartSession",
        "ssm:ResumeSession", "ssm:TerminateSession", "ssm:DescribeSessions",
        "ssm:DescribeInstanceInformation", "ssm:GetConnectionStatus",
        "ec2-instance-connect:SendSSHPublicKey", "kms:GenerateDataKey"]}],
}
AGENT_USER = "ssm-agent"   # the instance role of the SSM agent: decrypts session data keys
AGENT_POLICY = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["kms:Decrypt"], "Resource": "*"}]}
ANALYST_POLICY = {
    "Version": "2012-10-17",
    "Statement": [{"Effect": "Allow", "Action": ["sts:GetCallerIdentity"], "Resource": "*"}],
}


def user_policy(role_arns: list[str]) -> dict:
    return {"Version": "2012-10-17", "Statement": [
        {"Effect": "Allow", "Action": "sts:AssumeRole", "Resource": role_arns},
        {"Effect": "Allow", "Action": ["sts:GetCallerIdentity"], "Resource": "*"}]}


_SESSION: list = []   # one boto3 session for seeding and moto's region lookups (models parsed once)


def _session():
    if not _SESSION:
        import boto3.session

        _SESSION.append(boto3.session.Session())
    return _SESSION[0]


def _client(service: str, endpoint: str, region: str):
    return _session().client(service, endpoint_url=endpoint, region_name=region,
                             aws_access_key_id="seed", aws_secret_access_key="seed")


def seed_iam(endpoint: str, region: str) -> dict:
    """The user, its key, and the two roles with their policies."""
    iam = _client("iam", endpoint, region)
    user = iam.create_user(UserName=USER_NAME)["User"]
    roles = {}
    for name, policy in ((DEVELOPER_ROLE, DEVELOPER_POLICY), (UNBOUND_ROLE, ANALYST_POLICY)):
        arn = iam.create_role(RoleName=name, AssumeRolePolicyDocument=json.dumps(trust_policy(user["Arn"])),
                              MaxSessionDuration=43200)["Role"]["Arn"]
        iam.put_role_policy(RoleName=name, PolicyName=f"{name}-access", PolicyDocument=json.dumps(policy))
        roles[name] = arn
    iam.put_user_policy(UserName=USER_NAME, PolicyName="assume-roles",
                        PolicyDocument=json.dumps(user_policy(list(roles.values()))))
    key = iam.create_access_key(UserName=USER_NAME)["AccessKey"]
    return {"user": {"name": USER_NAME, "arn": user["Arn"], "access_key_id": key["AccessKeyId"],
                     "secret_access_key": key["SecretAccessKey"]},
            "roles": roles}


def seed_kms(endpoint: str, region: str) -> dict:
    """The KMS key Session Manager encrypts sessions with, and the agent's identity that may decrypt."""
    kms, iam = _client("kms", endpoint, region), _client("iam", endpoint, region)
    key = kms.create_key(Description="dbtunneld sandbox: Session Manager session encryption")["KeyMetadata"]
    kms.create_alias(AliasName="alias/dbtunneld-ssm-sessions", TargetKeyId=key["KeyId"])
    iam.create_user(UserName=AGENT_USER)
    iam.put_user_policy(UserName=AGENT_USER, PolicyName="decrypt-session-keys", PolicyDocument=json.dumps(AGENT_POLICY))
    access = iam.create_access_key(UserName=AGENT_USER)["AccessKey"]
    return {"key_id": key["KeyId"], "key_arn": key["Arn"], "alias": "alias/dbtunneld-ssm-sessions",
            "agent": {"access_key_id": access["AccessKeyId"], "secret_access_key": access["SecretAccessKey"]}}


def seed_ec2(endpoint: str, region: str, tag_map: dict[str, str] = BASTION_TAGS) -> str:
    """A running instance with ``tag_map`` (the bastion tagged for discovery); returns its id."""
    ec2 = _client("ec2", endpoint, region)
    tags = [{"Key": k, "Value": v} for k, v in tag_map.items()]
    inst = ec2.run_instances(ImageId="ami-0abcdef1234567890", InstanceType="t3.nano", MinCount=1, MaxCount=1,
                             TagSpecifications=[{"ResourceType": "instance", "Tags": tags}])["Instances"][0]
    return inst["InstanceId"]


def seed_rds(endpoint: str, region: str, clusters: dict[str, int]) -> dict:
    """One Aurora MySQL cluster per name; its port is the MariaDB port standing in for it."""
    rds = _client("rds", endpoint, region)
    out = {}
    for name, port in clusters.items():
        c = rds.create_db_cluster(DBClusterIdentifier=name, Engine="aurora-mysql", EngineVersion="8.0.mysql_aurora.3.05.2",
                                  MasterUsername="admin", MasterUserPassword="not-used-" + name, Port=port,
                                  DatabaseName=name,
                                  Tags=[{"Key": "dbtunneld:role", "Value": f"{name}-ro"}])["DBCluster"]
        out[name] = {"arn": c["DBClusterArn"], "endpoint": c["Endpoint"],
                     "reader_endpoint": c.get("ReaderEndpoint", ""), "port": c["Port"]}
    return out


def enable_enforcement() -> None:
    """From now on every request must be correctly signed and allowed by IAM."""
    from moto import settings
    from moto.core.responses import ActionAuthenticatorMixin

    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0
    ActionAuthenticatorMixin.request_count = 0


def write_private(path: Path, data: dict) -> None:
    """Write JSON with mode 0600, atomically (temp file + rename)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=2)
    os.replace(tmp, path)


def exit_with_parent() -> None:
    """Exit when the process that started us goes away (no orphans if the stack's owner is killed)."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            threading.Event().wait(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def memoize_boto3_regions() -> None:
    """moto's EC2 module builds several boto3 Sessions at import, each parsing the EC2 model
    (~0.2 s apiece) only to list regions; answer them from one shared session and a cache."""
    import boto3.session

    original = boto3.session.Session.get_available_regions
    cache: dict = {}

    def get_available_regions(self, service_name, partition_name="aws", allow_non_regional=False):
        key = (service_name, partition_name, allow_non_regional)
        if key not in cache:
            cache[key] = original(_session(), service_name, partition_name, allow_non_regional)
        return list(cache[key])

    boto3.session.Session.get_available_regions = get_available_regions


def limit_ec2_offerings(region: str) -> None:
    """moto's EC2 module parses the instance-type offerings of every region at import (~1 s,
    ~90 files); the sandbox uses one region, so load only that region's offerings."""
    import moto.utilities.utils as utils

    original = utils.load_resource

    def load_resource(resource: str):
        if "instance_type_offerings" in resource and Path(resource).name.split(".")[0] != region:
            return []
        return original(resource)

    utils.load_resource = load_resource


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dbtunneld.sandbox.moto_launcher", description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--seed-out", type=Path, required=True)
    p.add_argument("--region", default="us-east-1")
    p.add_argument("--cluster", action="append", default=[], metavar="NAME=PORT")
    args = p.parse_args(argv)
    os.environ.setdefault("MOTO_EC2_LOAD_DEFAULT_AMIS", "false")
    exit_with_parent()
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    memoize_boto3_regions()
    limit_ec2_offerings(args.region)
    from moto.moto_server.threaded_moto_server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=args.port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{args.port}"
    clusters = dict((c.split("=", 1)[0], int(c.split("=", 1)[1])) for c in args.cluster)
    seed = {"endpoint": endpoint, "account_id": ACCOUNT_ID, "region": args.region,
            "bastion_tags": BASTION_TAGS, **seed_iam(endpoint, args.region),
            "bastion_instance_id": seed_ec2(endpoint, args.region),
            "standby_instance_id": seed_ec2(endpoint, args.region, STANDBY_TAGS), "standby_tags": STANDBY_TAGS,
            "clusters": seed_rds(endpoint, args.region, clusters), "kms": seed_kms(endpoint, args.region)}
    enable_enforcement()
    write_private(args.seed_out, seed)
    print(f"moto ready on {endpoint}; enforcement on", flush=True)
    threading.Event().wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
