"""The Vault login as real companies run Vault: a regional or VPC STS endpoint, a namespace,
Vault's environment variables. Real stacks: OpenBao (namespaces are real OpenBao namespaces),
the aws-auth stand-in set up like Vault's config/client, moto verifying every signature."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import pytest
import requests

from dbtunneld.adapters.aws import AwsSession
from dbtunneld.adapters.iam_login import login_payload
from dbtunneld.adapters.vault import VaultClient
from dbtunneld.core.config import AwsConfig, VaultConfig, parse_config
from dbtunneld.core.errors import NeedsUserError, PermissionDeniedError
from dbtunneld.sandbox.openbao import bao_binary
from dbtunneld.sandbox.procs import free_port

REGION = "eu-west-1"
VPC_ENDPOINT = "https://vpce-0a1b2c3d4e5f67890-abcdefgh.sts.eu-west-1.vpce.amazonaws.com"
SMALL = dict(ssh=False, sso=False, ssm=False, clusters=("orders",))


def login(client: VaultClient, creds: dict, **kwargs):
    return client.login_aws_iam(creds["aws_access_key_id"], creds["aws_secret_access_key"],
                                creds["aws_session_token"], **kwargs)


def signed(payload: dict) -> tuple[str, dict]:
    """(URL, headers) of the request a login payload carries."""
    headers = json.loads(base64.b64decode(payload["iam_request_headers"]))
    return base64.b64decode(payload["iam_request_url"]).decode(), headers


# ------------------------------------------------------------------ regional and VPC STS

def test_login_payload_signs_the_region_host_and_server_id():
    payload = login_payload("AKIDEXAMPLE", "secret", "token", region=REGION, server_id="vault.example.com", role="r")
    url, headers = signed(payload)
    assert url == "https://sts.eu-west-1.amazonaws.com/" and headers["Host"] == ["sts.eu-west-1.amazonaws.com"]
    authz = headers["Authorization"][0]
    assert "/eu-west-1/sts/aws4_request" in authz
    signed_headers = authz.split("SignedHeaders=")[1].split(",")[0].split(";")
    assert {"host", "x-vault-aws-iam-server-id", "x-amz-date", "x-amz-security-token"} <= set(signed_headers)
    assert base64.b64decode(payload["iam_request_body"]) == b"Action=GetCallerIdentity&Version=2011-06-15"
    assert payload["iam_http_request_method"] == "POST" and payload["role"] == "r"
    url, headers = signed(login_payload("AKIDEXAMPLE", "secret", None, region="us-east-1"))
    assert url == "https://sts.amazonaws.com/" and "/us-east-1/sts/" in headers["Authorization"][0]


def test_regional_sts_login_and_the_old_global_signature_refused(make_stack):
    stack = make_stack(sts_region=REGION, **SMALL)
    vcfg = parse_config(stack.daemon_config()).vault
    assert vcfg.sts_region == REGION
    creds = stack.role_credentials()
    with VaultClient(vcfg) as client:
        token = login(client, creds)
        assert "db-developer" in token.info.policies
        client.revoke_self()
    # what dbtunneld did before vault.sts_region existed: us-east-1 at sts.amazonaws.com
    with VaultClient(replace(vcfg, sts_region="us-east-1")) as client, \
            pytest.raises(PermissionDeniedError, match="scoped to a valid region") as exc:
        login(client, creds)
    assert "vault.sts_region" in exc.value.hint
    with VaultClient(replace(vcfg, sts_region="auto")) as client:  # auto: the AWS profile's region
        login(client, creds, profile_region=lambda: REGION)
        client.revoke_self()


def test_vpc_endpoint_login(make_stack):
    stack = make_stack(sts_region=REGION, sts_endpoint=VPC_ENDPOINT, **SMALL)
    vcfg = parse_config(stack.daemon_config()).vault
    assert vcfg.sts_endpoint == VPC_ENDPOINT
    creds = stack.role_credentials()
    with VaultClient(vcfg) as client:
        login(client, creds)
        client.revoke_self()
    with VaultClient(replace(vcfg, sts_region="us-east-1")) as client, \
            pytest.raises(PermissionDeniedError, match="scoped to a valid region"):
        login(client, creds)


def test_auto_region_is_the_profiles_region(tmp_path, monkeypatch):
    config = tmp_path / "aws-config"
    config.write_text("[profile work]\nregion = ap-southeast-2\n\n[profile bare]\noutput = json\n")
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    work = AwsSession(AwsConfig(profile="work", region="eu-west-1"), home=tmp_path, config_file=config)
    assert work.profile_region() == "ap-southeast-2"
    bare = AwsSession(AwsConfig(profile="bare", region="eu-west-1"), home=tmp_path, config_file=config)
    assert bare.profile_region() == "eu-west-1"
    monkeypatch.setenv("AWS_REGION", "ca-central-1")
    assert work.profile_region() == "ca-central-1"


# ------------------------------------------------------------------ namespaces

def test_namespace_login_creds_renew_and_revoke(make_stack):
    stack = make_stack(vault_namespace="team-a", **SMALL)
    vcfg = parse_config(stack.daemon_config()).vault
    assert vcfg.namespace == "team-a"
    creds = stack.role_credentials()
    with VaultClient(vcfg) as client:
        login(client, creds)
        assert client.lookup_self().ttl > 0
        grant = client.database_creds("orders-ro")
        assert grant.username in stack.dynamic_users("orders")
        assert client.renew_lease(grant.lease_id, 60).duration == 60
        client.revoke_lease(grant.lease_id)
        assert grant.username not in stack.dynamic_users("orders")
        client.revoke_self()
    # the mounts exist only in the namespace: without it Vault refuses the login
    with VaultClient(replace(vcfg, namespace="")) as client, pytest.raises(PermissionDeniedError):
        login(client, creds)
    # VAULT_NAMESPACE stands in for vault.namespace, on every request
    with VaultClient(replace(vcfg, namespace=""), environ={"VAULT_NAMESPACE": "team-a"}) as client:
        login(client, creds)
        grant = client.database_creds("orders-ro")
        client.revoke_lease(grant.lease_id)
        client.revoke_self()


# ------------------------------------------------------------------ Vault's environment

def test_vault_token_env_and_file_are_never_used(stack, private_home, monkeypatch):
    vcfg = parse_config(stack.daemon_config()).vault
    token_file = Path(private_home) / ".vault-token"
    token_file.write_text(stack.root_token)  # a token that would work, were it picked up
    try:
        with VaultClient(vcfg) as client, pytest.raises(PermissionDeniedError):
            client.lookup_self()
        monkeypatch.setenv("VAULT_TOKEN", stack.root_token)
        with VaultClient(vcfg) as client:
            with pytest.raises(PermissionDeniedError):
                client.lookup_self()
            client.use_token(None)
            with pytest.raises(PermissionDeniedError):
                client.lookup_self()
        monkeypatch.setenv("VAULT_TOKEN", "s.bogus-token-from-the-shell")
        token_file.write_text("s.bogus-token-from-a-file")
        with VaultClient(vcfg) as client:  # bogus values do not spoil the login either
            login(client, stack.role_credentials())
            assert "db-developer" in client.lookup_self().policies
            client.revoke_self()
    finally:
        token_file.unlink()


def _healthy(address: str, ca: Path) -> bool:
    try:
        return ca.exists() and requests.get(f"{address}/v1/sys/health", verify=str(ca), timeout=1).ok
    except requests.RequestException:
        return False


@pytest.fixture
def tls_openbao(tmp_path):
    """A real OpenBao dev server with TLS (its own generated CA); yields (address, CA file)."""
    port = free_port()
    proc = subprocess.Popen(
        [bao_binary(), "server", "-dev", "-dev-tls", f"-dev-tls-cert-dir={tmp_path}", "-dev-root-token-id=root",
         "-dev-no-store-token", f"-dev-listen-address=127.0.0.1:{port}"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path,
        env={k: v for k, v in os.environ.items() if not k.startswith(("VAULT_", "BAO_"))} | {"HOME": str(tmp_path)})
    try:
        ca = tmp_path / "vault-ca.pem"
        deadline = time.monotonic() + 20
        while not _healthy(f"https://127.0.0.1:{port}", ca):
            assert proc.poll() is None and time.monotonic() < deadline, "OpenBao -dev-tls did not start"
            time.sleep(0.1)
        yield f"https://127.0.0.1:{port}", ca
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def test_vault_cacert_and_capath_are_trusted_when_ca_cert_is_unset(tls_openbao, tmp_path):
    address, ca = tls_openbao
    vcfg = VaultConfig(address=address, role="r")
    with VaultClient(vcfg, "root", environ={}) as client, pytest.raises(NeedsUserError, match="TLS"):
        client.lookup_self()
    with VaultClient(vcfg, "root", environ={"VAULT_CACERT": str(ca)}) as client:
        assert "root" in client.lookup_self().policies
    capath = tmp_path / "capath"
    capath.mkdir()
    (capath / "ca.pem").write_bytes(ca.read_bytes())
    subprocess.run(["openssl", "rehash", str(capath)], check=True, capture_output=True)
    with VaultClient(vcfg, "root", environ={"VAULT_CAPATH": str(capath)}) as client:
        assert "root" in client.lookup_self().policies
    with VaultClient(replace(vcfg, ca_cert=str(tmp_path / "capath" / "ca.pem")), "root",
                     environ={"VAULT_CACERT": "/nonexistent.pem"}) as client:
        assert "root" in client.lookup_self().policies  # vault.ca_cert wins over the environment
