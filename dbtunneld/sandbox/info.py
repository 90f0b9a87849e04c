"""What a running sandbox stack looks like to its clients: plain, JSON-able data.

``StackInfo`` holds every address, port, key path and credential of a stack;
``ClusterInfo`` one MariaDB "cluster". Secrets (root token, AWS secret key, DB admin
passwords) are masked by ``to_json()`` unless asked for.
"""

from __future__ import annotations

import shlex
from dataclasses import asdict, dataclass, field
from typing import Any

from .moto_launcher import ACCOUNT_ID, DEVELOPER_ROLE, UNBOUND_ROLE
from .openbao import JWT_MOUNT, Ttls

REGION = "us-east-1"
SERVER_ID = "vault.sandbox.dbtunneld.test"
PROFILE = "sandbox"
SSO_SESSION = "sandbox"
SSO_USER = "alice@example.com"
VAULT_ROLE = DEVELOPER_ROLE


@dataclass(frozen=True)
class ClusterInfo:
    """One sandbox cluster: the MariaDB standing in for an Aurora cluster."""

    name: str
    host: str
    port: int
    database: str
    table: str
    admin_user: str
    admin_password: str = field(repr=False)
    socket: str
    local_port: int                 # the daemon config's stable local port for it
    db_role: str                    # Vault role, read-only: "<name>-ro"
    db_role_rw: str                 # "<name>-rw"
    rds_endpoint: str = ""          # moto's Aurora endpoint name (does not resolve)


SECRET_FIELDS = ("root_token", "secret_access_key", "admin_password")


@dataclass(frozen=True)
class StackInfo:
    """Everything a client needs to use the running stack (plain data; ``to_json``)."""

    dir: str                        # the private temp dir (removed at teardown)
    home: str                       # private HOME holding .aws/config (set HOME to it)
    ttls: Ttls
    clusters: dict[str, ClusterInfo]
    # Vault
    vault_addr: str = ""            # the address clients use (the aws-auth stand-in)
    bao_addr: str = ""              # OpenBao itself (root token works on both)
    root_token: str = field(default="", repr=False)
    vault_role: str = VAULT_ROLE    # aws auth role name
    auth_mount: str = JWT_MOUNT     # aws auth mount ("aws")
    database_mount: str = "database"
    server_id: str = SERVER_ID      # X-Vault-AWS-IAM-Server-ID value
    vault_namespace: str = ""       # namespace holding the aws and database mounts ("" = root)
    sts_region: str = ""            # Vault's aws auth sts_region ("" = global sts.amazonaws.com)
    sts_endpoint: str = ""          # Vault's aws auth sts_endpoint ("" = derived from sts_region)
    # AWS (moto)
    aws_endpoint: str = ""          # moto: sts, iam, ec2, rds
    region: str = REGION
    account_id: str = ACCOUNT_ID
    user_name: str = ""
    user_arn: str = ""
    access_key_id: str = ""
    secret_access_key: str = field(default="", repr=False)
    role_name: str = DEVELOPER_ROLE
    role_arn: str = ""
    unbound_role_name: str = UNBOUND_ROLE
    unbound_role_arn: str = ""
    bastion_instance_id: str = ""
    bastion_tags: dict[str, str] = field(default_factory=dict)
    # SSO (stand-in)
    sso_endpoint: str = ""          # base URL; sso-oidc under /oidc.<region>, sso under /portal.sso.<region>
    sso_start_url: str = ""
    sso_region: str = REGION
    sso_account_id: str = ACCOUNT_ID
    sso_role_name: str = DEVELOPER_ROLE
    sso_session_name: str = SSO_SESSION
    profile: str = PROFILE          # SSO profile (sso_session form) in aws_config_file
    aws_config_file: str = ""
    # SSM (stand-in, optional)
    ssm_endpoint: str = ""
    # bastion (sshd)
    ssh_host: str = "127.0.0.1"
    ssh_port: int = 0
    ssh_user: str = ""
    ssh_key_file: str = ""
    known_hosts: str = ""
    host_key: str = ""              # "ssh-ed25519 AAAA..." (no host part)
    relay_command: tuple[str, ...] = ()   # ProxyCommand argv reaching sshd over stdio
    # daemon
    dbtunneld_home: str = ""        # DBTUNNELD_HOME for a daemon on this stack
    config_file: str = ""           # a ready daemon config (TOML), transport "ssh"

    @property
    def proxy_command(self) -> str:
        """``relay_command`` as one shell string (for ``paramiko.ProxyCommand``)."""
        return shlex.join(self.relay_command)

    def oidc_url(self, region: str | None = None) -> str:
        """The SSO OIDC endpoint of ``region`` (default: the Identity Center's) at the stand-in."""
        return f"{self.sso_endpoint}/oidc.{region or self.sso_region}"

    def portal_url(self, region: str | None = None) -> str:
        """The SSO portal endpoint of ``region`` (default: the Identity Center's) at the stand-in."""
        return f"{self.sso_endpoint}/portal.sso.{region or self.sso_region}"

    def endpoint_urls(self, region_template: bool = True) -> dict[str, str]:
        """Endpoint per AWS service, keyed as in dbtunneld's config (``sso-oidc`` etc.); with
        ``region_template`` the SSO ones carry ``{region}`` (dbtunneld fills in each client's
        region), else the Identity Center's region (for botocore / the AWS CLI)."""
        urls = {}
        if self.aws_endpoint:
            urls.update(sts=self.aws_endpoint, ec2=self.aws_endpoint, rds=self.aws_endpoint)
            urls["ssm"] = self.ssm_endpoint or self.aws_endpoint
        if self.sso_endpoint:
            region = "{region}" if region_template else None
            urls.update({"sso": self.portal_url(region), "sso-oidc": self.oidc_url(region)})
        return urls

    def to_json(self, secrets: bool = False) -> dict:
        """A JSON-able dict; secret values are masked unless ``secrets=True``."""
        data = asdict(self)
        data["proxy_command"] = self.proxy_command
        data["endpoint_urls"] = self.endpoint_urls()
        if not secrets:
            _mask(data)
        return data


def _mask(obj: Any) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            if k in SECRET_FIELDS and v:
                obj[k] = "***"
            else:
                _mask(v)
