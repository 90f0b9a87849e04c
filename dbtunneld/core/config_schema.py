"""What a config is: the frozen value types of config.toml's sections and clusters.

Built by ``dbtunneld.core.config`` (load and validate) from ``config_sections`` (one parser per section);
every other module reads these types and nothing else of the TOML.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class AwsConfig:
    profile: str = ""
    region: str = "us-east-1"
    endpoint_urls: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class VaultConfig:
    address: str
    role: str
    ca_cert: str = ""
    auth_mount: str = "aws"
    iam_server_id: str = ""
    database_mount: str = "database"
    timeout: float = 10.0
    sts_region: str = "us-east-1"    # region the login's GetCallerIdentity is signed for ("auto": the profile's)
    sts_endpoint: str = ""           # URL to sign instead of https://sts.<sts_region>.amazonaws.com/ (VPC endpoint)
    namespace: str = ""              # Vault Enterprise / HCP namespace (X-Vault-Namespace); "" = VAULT_NAMESPACE or root


@dataclass(frozen=True)
class BastionConfig:
    transport: str = "ssm-ssh"
    instance_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    host: str = ""
    port: int = 22
    user: str = "ec2-user"
    key_file: str = ""
    host_key: str = ""
    known_hosts: str = ""
    ec2_instance_connect: bool = False
    plugin_path: str = ""
    client: str = "paramiko"         # transport "ssh": "paramiko" or "openssh" (an ssh -M master moves the bytes)


@dataclass(frozen=True)
class CredentialSettings:
    mint_ahead: float = 600.0        # mint new DB creds this long before the lease's max TTL
    revoke_timeout: float = 10.0


@dataclass(frozen=True)
class TunnelSettings:
    port_range: tuple[int, int] = (13306, 13399)
    connect_wait: float = 20.0       # how long a client waits while the upstream is rebuilt
    health_interval: float = 30.0
    health_timeout: float = 5.0
    keepalive_interval: float = 5.0     # + health_timeout = worst time to notice a frozen bastion
    backoff_initial: float = 0.5
    backoff_max: float = 30.0


@dataclass(frozen=True)
class UiSettings:
    clipboard_clear_seconds: float = 30.0
    notifications: bool = True


@dataclass(frozen=True)
class CatalogSettings:
    """A team's shared cluster list: a TOML file (path or https URL) and/or RDS tags."""

    source: str = ""                 # a path (relative to config.toml) or an https:// URL
    rds_tags: bool = False           # clusters tagged dbtunneld:role (and dbtunneld:port)
    timeout: float = 10.0            # for an https source

    @property
    def enabled(self) -> bool:
        return bool(self.source) or self.rds_tags


@dataclass(frozen=True)
class ClusterConfig:
    name: str
    endpoint: str
    db_role: str
    port: int = 3306
    local_port: int | None = None
    database: str = ""
    autoconnect: bool = False
    production: bool = False
    transport: str = ""              # overrides bastion.transport for this cluster
    reader_port: int | None = None   # a second local port to the cluster's reader endpoint
    reader_endpoint: str = ""        # default: the writer endpoint with ".cluster-" -> ".cluster-ro-"
    reader_of: str = ""              # set on the reader unit built from a cluster (not a config key)
    login: str = "local"             # "local": a stable local user/password on the port; "lease": pass-through
    local_user: str = ""             # the local user name (default: the cluster name)
    local_tls: bool = False          # login = "local": offer TLS on the port (self-signed, per machine)
    upstream_tls: str = "off"        # login = "local": TLS to the server inside the tunnel: off | auto | required

    def effective_transport(self, bastion: BastionConfig) -> str:
        return self.transport or bastion.transport


@dataclass(frozen=True)
class Config:
    vault: VaultConfig
    clusters: tuple[ClusterConfig, ...]
    aws: AwsConfig = field(default_factory=AwsConfig)
    bastion: BastionConfig = field(default_factory=BastionConfig)
    credentials: CredentialSettings = field(default_factory=CredentialSettings)
    tunnels: TunnelSettings = field(default_factory=TunnelSettings)
    ui: UiSettings = field(default_factory=UiSettings)
    catalog: CatalogSettings = field(default_factory=CatalogSettings)
    source: str = "<config>"
    catalog_clusters: tuple[str, ...] = ()     # names of the clusters that came from the catalog

    def cluster(self, name: str) -> ClusterConfig:
        for c in self.clusters:
            if c.name == name:
                return c
        known = ", ".join(c.name for c in self.clusters) or "none"
        raise KeyError(f'no cluster named "{name}" (known: {known})')


def aurora_reader_endpoint(endpoint: str) -> str:
    """Aurora's reader endpoint for a cluster (writer) endpoint, or "" when it is not one."""
    head, sep, tail = endpoint.partition(".cluster-")
    if not sep or tail.startswith("ro-") or not endpoint.endswith(".rds.amazonaws.com"):
        return ""
    return f"{head}.cluster-ro-{tail}"
