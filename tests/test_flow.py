"""The whole access flow with the libraries only (no dbtunneld engine), on the real stack:

AWS SSO device login against the stand-in -> role credentials (botocore's SSO provider,
profile ``sandbox``) -> hvac ``iam_login`` with the server-id header -> ``database/creds``
-> sshtunnel over a ProxyCommand relay to sshd (host key checked) -> PyMySQL query through
the tunnel -> lease revoke -> the user is gone from MariaDB.
"""

from __future__ import annotations

import base64
import datetime
import json
import time
import urllib.request

import boto3
import hvac
import paramiko
import pymysql
import pytest
import sshtunnel

DEVICE_GRANT = "urn:ietf:params:oauth:grant-type:device_code"


def sso_device_login(stack) -> None:
    """What ``aws sso login`` does: register, start device authorization, let the user
    allow it (here: visit the verification URL), poll honouring interval and slow_down,
    and write the token cache botocore reads for the profile's ``sso_session``."""
    oidc = boto3.client("sso-oidc", region_name=stack.sso_region)   # endpoint from the profile's services
    reg = oidc.register_client(clientName="dbtunneld-flow-test", clientType="public",
                               scopes=["sso:account:access"])
    auth = oidc.start_device_authorization(clientId=reg["clientId"], clientSecret=reg["clientSecret"],
                                           startUrl=stack.sso_start_url)
    with urllib.request.urlopen(auth["verificationUriComplete"], timeout=10) as resp:
        assert resp.status == 200
    interval, deadline = auth["interval"], time.monotonic() + 30
    while True:
        time.sleep(interval)
        try:
            token = oidc.create_token(clientId=reg["clientId"], clientSecret=reg["clientSecret"],
                                      grantType=DEVICE_GRANT, deviceCode=auth["deviceCode"])
            break
        except oidc.exceptions.SlowDownException:
            interval += 5
        except oidc.exceptions.AuthorizationPendingException:
            pass
        assert time.monotonic() < deadline, "device authorization never completed"
    now = datetime.datetime.now(datetime.timezone.utc)
    iso = lambda t: t.strftime("%Y-%m-%dT%H:%M:%SZ")  # noqa: E731
    cache = stack.sso_cache_file()
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({
        "startUrl": stack.sso_start_url, "region": stack.sso_region, "accessToken": token["accessToken"],
        "expiresAt": iso(now + datetime.timedelta(seconds=token["expiresIn"])),
        "clientId": reg["clientId"], "clientSecret": reg["clientSecret"],
        "registrationExpiresAt": iso(now + datetime.timedelta(days=90)), "refreshToken": token["refreshToken"]}))


def host_key(line: str) -> paramiko.PKey:
    kind, data = line.split()[:2]
    return paramiko.PKey.from_type_string(kind, base64.b64decode(data))


@pytest.fixture
def aws_env(stack, monkeypatch):
    for key, value in stack.env().items():
        monkeypatch.setenv(key, value)


def test_sso_to_vault_to_tunnel_to_query_and_revoke(stack, aws_env):
    # 1. AWS SSO sign-in, then role credentials through botocore's own SSO provider
    sso_device_login(stack)
    session = boto3.Session(profile_name=stack.profile)
    ident = session.client("sts").get_caller_identity()
    assert ident["Arn"] == "arn:aws:sts::123456789012:assumed-role/db-developer/alice@example.com"
    creds = session.get_credentials().get_frozen_credentials()

    # 2. Vault: AWS IAM login with the server-id header, then a leased DB user
    vault = hvac.Client(url=stack.vault_addr)
    vault.auth.aws.iam_login(creds.access_key, creds.secret_key, creds.token, header_value=stack.server_id,
                             role=stack.vault_role, region=stack.region)
    lease = vault.secrets.database.generate_credentials(stack.clusters["orders"].db_role)
    user, password = lease["data"]["username"], lease["data"]["password"]
    assert user in stack.dynamic_users("orders")

    # 3. SSH tunnel through the bastion, reached over a stdio ProxyCommand, host key pinned
    orders = stack.clusters["orders"]
    with sshtunnel.SSHTunnelForwarder(
            (stack.ssh_host, stack.ssh_port), ssh_username=stack.ssh_user, ssh_pkey=stack.ssh_key_file,
            ssh_host_key=host_key(stack.host_key), ssh_proxy=paramiko.ProxyCommand(stack.proxy_command),
            allow_agent=False, host_pkey_directories=[], remote_bind_address=(orders.host, orders.port),
            local_bind_address=("127.0.0.1", 0)) as tunnel:
        # 4. a query through the tunnel as the leased user; writes are not granted
        conn = pymysql.connect(host="127.0.0.1", port=tunnel.local_bind_port, user=user, password=password,
                               database=orders.database, connect_timeout=10)
        with conn.cursor() as cur:
            cur.execute(f"SELECT COUNT(*), CURRENT_USER() FROM `{orders.table}`")
            count, current = cur.fetchone()
            with pytest.raises(pymysql.err.OperationalError) as denied:
                cur.execute(f"DELETE FROM `{orders.table}`")
        conn.close()
    assert count == 300 and current == f"{user}@%"
    assert denied.value.args[0] == 1142   # DELETE command denied

    # 5. revoke the lease: the user is dropped and can no longer log in
    vault.sys.revoke_lease(lease["lease_id"])
    assert user not in stack.dynamic_users("orders")
    with pytest.raises(pymysql.err.OperationalError) as gone:
        pymysql.connect(host=orders.host, port=orders.port, user=user, password=password, connect_timeout=5)
    assert gone.value.args[0] in (1045, 1698)
    vault.auth.token.revoke_self()


def test_wrong_host_key_is_refused(stack):
    other = paramiko.Ed25519Key.from_private_key_file(stack.ssh_key_file)   # not the server's key
    orders = stack.clusters["orders"]
    forwarder = sshtunnel.SSHTunnelForwarder(
        (stack.ssh_host, stack.ssh_port), ssh_username=stack.ssh_user, ssh_pkey=stack.ssh_key_file,
        ssh_host_key=other, allow_agent=False, host_pkey_directories=[],
        remote_bind_address=(orders.host, orders.port), local_bind_address=("127.0.0.1", 0))
    with pytest.raises(sshtunnel.BaseSSHTunnelForwarderError):
        forwarder.start()
    forwarder.stop()


def test_bastion_forwards_only_to_the_clusters(stack):
    client = paramiko.SSHClient()
    client.get_host_keys().add(f"[{stack.ssh_host}]:{stack.ssh_port}", host_key(stack.host_key).get_name(),
                               host_key(stack.host_key))
    client.connect(stack.ssh_host, stack.ssh_port, username=stack.ssh_user, key_filename=stack.ssh_key_file,
                   allow_agent=False, look_for_keys=False)
    try:
        transport = client.get_transport()
        ok = transport.open_channel("direct-tcpip", ("127.0.0.1", stack.clusters["billing"].port), ("127.0.0.1", 0))
        assert ok.recv(5)[4:5] == b"\x0a"    # MySQL greeting
        ok.close()
        with pytest.raises(paramiko.ChannelException):   # OpenBao is not a permitted target
            transport.open_channel("direct-tcpip", ("127.0.0.1", int(stack.bao_addr.rsplit(":", 1)[1])),
                                   ("127.0.0.1", 0))
        _, out, _ = client.exec_command("id", timeout=5)  # ForceCommand /bin/false: no shell
        assert out.read() == b"" and out.channel.recv_exit_status() == 1
    finally:
        client.close()
