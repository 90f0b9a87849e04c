"""TOML config -> frozen dataclasses, validated as a whole.

``parse_config`` collects every problem (with its key path and the fix) into one
``ConfigError``; it never stops at the first one and never raises anything else on bad input.

Example::

    [aws]
    profile = "dev-sso"
    region = "eu-west-1"

    [vault]
    address = "https://vault.example.com:8200"
    role = "db-developer"
    iam_server_id = "vault.example.com"

    [bastion]
    transport = "ssm-ssh"
    tags = { Name = "bastion" }
    user = "ec2-user"

    [[clusters]]
    name = "orders"
    endpoint = "orders.cluster-abc.eu-west-1.rds.amazonaws.com"
    local_port = 13306
    db_role = "orders-ro"
"""

from __future__ import annotations

import difflib
import ipaddress
import re
import shutil
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable
from urllib.parse import urlsplit

from .errors import ConfigError, Problem

TRANSPORTS = ("ssm-ssh", "ssm-port-forward", "ssh", "plugin")
SSH_CLIENTS = ("paramiko", "openssh")     # bastion.client: who speaks SSH for transport "ssh"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
INSTANCE_RE = re.compile(r"^(i-[0-9a-f]{8,17}|mi-[0-9a-f]{8,17}|ecs:[A-Za-z0-9_-]+_[A-Za-z0-9]+_[A-Za-z0-9-]+)$")
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d")
AWS_ENDPOINT_SERVICES = ("sts", "ec2", "rds", "ssm", "kms", "sso", "sso-oidc", "ec2-instance-connect")


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


class _Reader:
    """Typed access to one TOML table that records problems instead of raising."""

    def __init__(self, table: Any, path: str, problems: list[Problem]) -> None:
        self.path = path
        self.problems = problems
        self.seen: set[str] = set()
        self.valid = isinstance(table, dict)
        if not self.valid:
            self.problem("", f"must be a table, not {_kind(table)}", f"write it as [{path}]")
            table = {}
        self.table = table

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def problem(self, name: str, message: str, fix: str = "") -> None:
        where = self.key(name) if name else self.path
        self.problems.append(Problem(where, message, fix))

    def get(self, name: str, kind: type | tuple, default: Any, *, required: bool = False, fix: str = "") -> Any:
        self.seen.add(name)
        if name not in self.table:
            if required and self.valid:
                self.problem(name, "is required", fix)
            return default
        value = self.table[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
            want = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
            self.problem(name, f"must be {want}, not {_kind(value)} {value!r}", f"write {want}")
            return default
        return value

    def text(self, name: str, default: str = "", **kw) -> str:
        value = self.get(name, str, default, **kw).strip()
        if kw.get("required") and not value and isinstance(self.table.get(name), str):
            self.problem(name, "is empty", kw.get("fix", ""))
        return value

    def number(self, name: str, default: float, lo: float, hi: float) -> float:
        value = self.get(name, float, default)
        if not lo <= value <= hi:
            self.problem(name, f"{value:g} is out of range", f"use a value from {lo:g} to {hi:g}")
            return default
        return value

    def port(self, name: str, default: int | None, *, required: bool = False) -> int | None:
        value = self.get(name, int, default, required=required, fix="give a TCP port from 1 to 65535")
        if value is not None and not 1 <= value <= 65535:
            self.problem(name, f"port {value} is out of range", "use a port from 1 to 65535")
            return default
        return value

    def string_table(self, name: str) -> dict[str, str]:
        value = self.get(name, dict, {})
        out = {}
        for k, v in value.items():
            if not isinstance(v, str):
                self.problem(f"{name}.{k}", f"must be a string, not {_kind(v)}", 'write it in quotes, e.g. "bastion"')
            else:
                out[k] = v
        return out

    def finish(self) -> None:
        for name in self.table:
            if name not in self.seen:
                close = difflib.get_close_matches(name, sorted(self.seen), n=1)
                fix = f'did you mean "{close[0]}"?' if close else "remove it"
                self.problem(name, "unknown key", fix)


_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true or false",
               dict: "a table", list: "a list"}


def _kind(value: Any) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
            dict: "a table", list: "a list"}.get(type(value), type(value).__name__)


def _section(doc: dict, name: str, problems: list[Problem]) -> _Reader:
    return _Reader(doc.get(name, {}), name, problems)


def _parse_aws(r: _Reader) -> AwsConfig:
    endpoints = r.string_table("endpoint_urls")
    for svc, url in endpoints.items():
        if svc not in AWS_ENDPOINT_SERVICES:
            r.problem(f"endpoint_urls.{svc}", "unknown service", f"use one of {', '.join(AWS_ENDPOINT_SERVICES)}")
        elif not urlsplit(url).scheme in ("http", "https"):
            r.problem(f"endpoint_urls.{svc}", f"{url!r} is not an http(s) URL", "write e.g. https://sts.eu-west-1.amazonaws.com")
    region = r.text("region", "us-east-1")
    if not REGION_RE.fullmatch(region):
        r.problem("region", f"{region!r} is not an AWS region", 'write e.g. "eu-west-1"')
    return AwsConfig(profile=r.text("profile"), region=region, endpoint_urls=endpoints)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_vault(r: _Reader) -> VaultConfig:
    address = r.text("address", required=True, fix='write e.g. address = "https://vault.example.com:8200"')
    if address:
        parts = urlsplit(address)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            r.problem("address", f"{address!r} is not a URL", 'write e.g. "https://vault.example.com:8200"')
        elif parts.scheme == "http" and not _is_loopback(parts.hostname):
            r.problem("address", f"{address!r} sends the Vault token in clear text",
                      "use https (plain http is allowed only for a loopback address)")
        elif parts.username or parts.password or parts.query:
            r.problem("address", "must not carry credentials or a query", "keep only scheme://host:port")
    role = r.text("role", required=True, fix='name the Vault aws auth role, e.g. role = "db-developer"')
    ca = r.text("ca_cert")
    if ca and not Path(ca).expanduser().is_file():
        r.problem("ca_cert", f"file {ca!r} does not exist", "give the path of the PEM file of Vault's CA")
    cfg = VaultConfig(
        address=address.rstrip("/"), role=role, ca_cert=ca,
        auth_mount=r.text("auth_mount", "aws").strip("/") or "aws",
        iam_server_id=r.text("iam_server_id"),
        database_mount=r.text("database_mount", "database").strip("/") or "database",
        timeout=r.number("timeout", 10.0, 0.5, 120.0),
        sts_region=_sts_region(r), sts_endpoint=_sts_endpoint(r), namespace=_namespace(r),
    )
    return cfg


def _sts_region(r: _Reader) -> str:
    region = r.text("sts_region", "us-east-1")
    if region != "auto" and not REGION_RE.fullmatch(region):
        r.problem("sts_region", f"{region!r} is not an AWS region",
                  'write the region Vault\'s aws auth signs STS for (its sts_region), e.g. "eu-west-1", '
                  'or "auto" for the AWS profile\'s region')
    return region


def _sts_endpoint(r: _Reader) -> str:
    url = r.text("sts_endpoint")
    if not url:
        return ""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        r.problem("sts_endpoint", f"{url!r} is not a URL",
                  'write the STS endpoint Vault is configured with, e.g. "https://sts.eu-west-1.amazonaws.com"')
    elif parts.path.strip("/") or parts.query or parts.fragment or parts.username:
        r.problem("sts_endpoint", f"{url!r} has a path, query or credentials",
                  "keep only scheme://host[:port], as in Vault's sts_endpoint")
    elif parts.scheme == "http" and not _is_loopback(parts.hostname):
        r.problem("sts_endpoint", f"{url!r} is plain http", "use https (plain http is allowed only for a loopback address)")
    return url.rstrip("/")


def _namespace(r: _Reader) -> str:
    namespace = r.text("namespace").strip("/")
    if namespace and not all(NAME_RE.match(part) for part in namespace.split("/")):
        r.problem("namespace", f"{namespace!r} is not a Vault namespace path",
                  'write e.g. "admin" (HCP Vault) or "team-a/dev": names of letters, digits, "-", "_" and "."')
    return namespace


def _parse_bastion(r: _Reader) -> BastionConfig:
    transport = r.text("transport", "ssm-ssh")
    if transport not in TRANSPORTS:
        r.problem("transport", f"unknown transport {transport!r}", f"use one of {', '.join(TRANSPORTS)}")
    instance_id = r.text("instance_id")
    if instance_id and not INSTANCE_RE.match(instance_id):
        r.problem("instance_id", f"{instance_id!r} is not an instance id",
                  'write e.g. "i-0123456789abcdef0" or "ecs:cluster_taskid_runtimeid"')
    tags = r.string_table("tags")
    host = r.text("host")
    if transport in ("ssm-ssh", "ssm-port-forward", "plugin") and not (instance_id or "tags" in r.table):
        r.problem("", f"transport {transport!r} needs a target", "set bastion.instance_id or bastion.tags")
    if instance_id and tags:
        r.problem("tags", "both instance_id and tags are set", "keep one of them")
    if transport == "ssh" and not host:
        r.problem("host", "transport 'ssh' needs the bastion's address", 'write e.g. host = "bastion.example.com"')
    key_file = r.text("key_file")
    if key_file and not Path(key_file).expanduser().is_file():
        r.problem("key_file", f"file {key_file!r} does not exist", "give the path of your SSH private key, or remove it to use the agent")
    host_key = r.text("host_key")
    if host_key and len(host_key.split()) < 2:
        r.problem("host_key", "is not an OpenSSH public key line", 'write "ssh-ed25519 AAAA..." as in known_hosts')
    client = _ssh_client(r, r.get("ec2_instance_connect", bool, False))
    cfg = BastionConfig(
        client=client, transport=transport, instance_id=instance_id, tags=tags, host=host,
        port=r.port("port", 22) or 22, user=r.text("user", "ec2-user"), key_file=key_file,
        host_key=host_key, known_hosts=r.text("known_hosts"),
        ec2_instance_connect=r.get("ec2_instance_connect", bool, False),
        plugin_path=r.text("plugin_path"),
    )
    return cfg


def _ssh_client(r: _Reader, ec2_instance_connect: bool) -> str:
    client = r.text("client", "paramiko")
    if client not in SSH_CLIENTS:
        r.problem("client", f"unknown SSH client {client!r}", f"use one of {', '.join(SSH_CLIENTS)}")
        return "paramiko"
    if client == "openssh" and ec2_instance_connect:
        r.problem("client", '"openssh" cannot log in with the EC2 Instance Connect key (it exists only in memory)',
                  'set client = "paramiko", or turn ec2_instance_connect off and use your own key')
    elif client == "openssh" and (sys.platform.startswith("win") or not shutil.which("ssh")):
        r.problem("client", '"openssh" needs OpenSSH\'s ssh on PATH with connection sharing (ControlMaster; '
                  'not OpenSSH for Windows)', 'install the OpenSSH client, or set client = "paramiko"')
    return client


def _parse_tunnels(r: _Reader) -> TunnelSettings:
    rng = r.get("port_range", list, [13306, 13399])
    port_range = (13306, 13399)
    if len(rng) != 2 or not all(isinstance(p, int) and not isinstance(p, bool) and 1024 <= p <= 65535 for p in rng) or rng[0] > rng[1]:
        r.problem("port_range", f"{rng!r} is not a port range", "write two ports from 1024 to 65535, low first, e.g. [13306, 13399]")
    else:
        port_range = (rng[0], rng[1])
    return TunnelSettings(
        port_range=port_range,
        connect_wait=r.number("connect_wait", 20.0, 0.0, 300.0),
        health_interval=r.number("health_interval", 30.0, 1.0, 3600.0),
        health_timeout=r.number("health_timeout", 5.0, 0.5, 120.0),
        keepalive_interval=r.number("keepalive_interval", 5.0, 1.0, 600.0),
        backoff_initial=r.number("backoff_initial", 0.5, 0.05, 60.0),
        backoff_max=r.number("backoff_max", 30.0, 1.0, 3600.0),
    )


def _parse_catalog(r: _Reader) -> CatalogSettings:
    source = r.text("source")
    scheme = urlsplit(source).scheme if "://" in source else ""
    if scheme and scheme != "https":
        r.problem("source", f"{source!r} is not an https URL",
                  "use https://... (the catalog decides which hosts you reach), or a file path")
    elif scheme and not urlsplit(source).hostname:
        r.problem("source", f"{source!r} has no host", 'write e.g. "https://git.example.com/team/dbtunneld.toml"')
    return CatalogSettings(source=source, rds_tags=r.get("rds_tags", bool, False),
                           timeout=r.number("timeout", 10.0, 0.5, 120.0))


LOGINS = ("local", "lease")
LOCAL_USER_RE = re.compile(r"^[A-Za-z0-9._-]+$")


def _parse_cluster(r: _Reader) -> ClusterConfig | None:
    name = r.text("name", required=True, fix='write e.g. name = "orders"')
    if name and not NAME_RE.match(name):
        r.problem("name", f"{name!r} is not a valid name", "use letters, digits, '.', '_' and '-' (max 63)")
    transport = r.text("transport")
    if transport and transport not in TRANSPORTS:
        r.problem("transport", f"unknown transport {transport!r}", f"use one of {', '.join(TRANSPORTS)}")
    local_port = r.port("local_port", None)
    if local_port is not None and local_port < 1024:
        r.problem("local_port", f"port {local_port} is privileged", "pick a port from 1024 to 65535, e.g. 13306")
        local_port = None
    endpoint = r.text("endpoint", required=True, fix="give the cluster's writer or reader endpoint")
    reader_port, reader_endpoint = _parse_reader(r, endpoint)
    cluster = ClusterConfig(
        name=name,
        endpoint=endpoint, reader_port=reader_port, reader_endpoint=reader_endpoint,
        db_role=r.text("db_role", required=True, fix='name the Vault database role, e.g. db_role = "orders-ro"'),
        port=r.port("port", 3306) or 3306,
        local_port=local_port,
        database=r.text("database"),
        autoconnect=r.get("autoconnect", bool, False),
        production=r.get("production", bool, False),
        transport=transport,
        login=_parse_login(r),
        local_user=_parse_local_user(r),
        local_tls=r.get("local_tls", bool, False),
        upstream_tls=_parse_upstream_tls(r),
    )
    return cluster


def _parse_login(r: _Reader) -> str:
    login = r.text("login", "local")
    if login not in LOGINS:
        r.problem("login", f"unknown login {login!r}",
                  'use "local" (a stable local user and password; saved logins keep working) or "lease" '
                  "(log in with the leased Vault user, which changes at each rotation)")
        return "local"
    return login


UPSTREAM_TLS = ("off", "auto", "required")


def _parse_upstream_tls(r: _Reader) -> str:
    mode = r.text("upstream_tls", "off")
    if mode not in UPSTREAM_TLS:
        r.problem("upstream_tls", f"unknown mode {mode!r}",
                  'use "off" (the tunnel already encrypts the path), "auto" (TLS when the server offers it) '
                  'or "required" (refuse a server without TLS)')
        return "off"
    return mode


def _parse_local_user(r: _Reader) -> str:
    user = r.text("local_user")
    if user and (len(user) > 32 or not LOCAL_USER_RE.match(user)):
        r.problem("local_user", f"{user!r} is not a usable MySQL user name",
                  "use up to 32 letters, digits, '.', '_' or '-', e.g. local_user = \"me\"")
        return ""
    return user


def aurora_reader_endpoint(endpoint: str) -> str:
    """Aurora's reader endpoint for a cluster (writer) endpoint, or "" when it is not one."""
    head, sep, tail = endpoint.partition(".cluster-")
    if not sep or tail.startswith("ro-") or not endpoint.endswith(".rds.amazonaws.com"):
        return ""
    return f"{head}.cluster-ro-{tail}"


def _parse_reader(r: _Reader, endpoint: str) -> tuple[int | None, str]:
    reader_port = r.port("reader_port", None)
    if reader_port is not None and reader_port < 1024:
        r.problem("reader_port", f"port {reader_port} is privileged", "pick a port from 1024 to 65535, e.g. 13307")
        reader_port = None
    reader_endpoint = r.text("reader_endpoint") or aurora_reader_endpoint(endpoint)
    if reader_port is not None and not reader_endpoint:
        r.problem("reader_endpoint", "is needed with reader_port (the endpoint is not an Aurora cluster endpoint)",
                  'write e.g. reader_endpoint = "orders.cluster-ro-abc.eu-west-1.rds.amazonaws.com"')
    return reader_port, reader_endpoint


def _check_clusters(clusters: list[ClusterConfig], problems: list[Problem]) -> None:
    names: dict[str, int] = {}
    ports: dict[int, str] = {}
    for i, c in enumerate(clusters):
        where = f"clusters[{i}]"
        if c.name in names:
            problems.append(Problem(f"{where}.name", f'cluster "{c.name}" is defined twice (also clusters[{names[c.name]}])', "give each cluster a unique name"))
        names.setdefault(c.name, i)
        for key, port, label in (("local_port", c.local_port, c.name), ("reader_port", c.reader_port, f"{c.name} (reader)")):
            if port is not None:
                if port in ports:
                    problems.append(Problem(f"{where}.{key}", f'cluster "{c.name}": {key} {port} is already used by cluster "{ports[port]}"', "pick another port"))
                ports.setdefault(port, label)


def parse_config(text: str, source: str = "<config>") -> Config:
    """Parse and validate; raise ConfigError listing every problem."""
    problems: list[Problem] = []
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [Problem("", f"not valid TOML: {exc}", "fix the syntax at that line")]) from None
    readers: list[_Reader] = []

    def section(name: str, parse: Callable[[_Reader], Any]) -> Any:
        r = _section(doc, name, problems)
        readers.append(r)
        return parse(r)

    aws = section("aws", _parse_aws)
    vault = section("vault", _parse_vault) if "vault" in doc else None
    if vault is None:
        problems.append(Problem("vault", "section is missing", "add [vault] with address and role"))
    bastion = section("bastion", _parse_bastion)
    creds = section("credentials", lambda r: CredentialSettings(
        mint_ahead=r.number("mint_ahead", 600.0, 0.0, 86400.0),
        revoke_timeout=r.number("revoke_timeout", 10.0, 0.5, 120.0)))
    tunnels = section("tunnels", _parse_tunnels)
    ui = section("ui", lambda r: UiSettings(
        clipboard_clear_seconds=r.number("clipboard_clear_seconds", 30.0, 0.0, 3600.0),
        notifications=r.get("notifications", bool, True)))
    catalog = section("catalog", _parse_catalog)
    clusters = _parse_clusters(doc.get("clusters"), problems, readers, optional=catalog.enabled)
    _check_clusters(clusters, problems)
    for c in clusters:
        if c.effective_transport(bastion) == "ssh" and not bastion.host:
            if not any(p.path == "bastion.host" for p in problems):
                problems.append(Problem("bastion.host", f'cluster "{c.name}" uses transport "ssh" but no bastion host is set', 'write e.g. host = "bastion.example.com"'))
    for r in readers:
        r.finish()
    known = {"aws", "vault", "bastion", "credentials", "tunnels", "ui", "clusters", "catalog"}
    for key in doc:
        if key not in known:
            close = difflib.get_close_matches(key, sorted(known), n=1)
            problems.append(Problem(key, "unknown section", f'did you mean "{close[0]}"?' if close else "remove it"))
    if problems:
        raise ConfigError(source, problems)
    return Config(vault=vault, clusters=tuple(clusters), aws=aws, bastion=bastion,
                  credentials=creds, tunnels=tunnels, ui=ui, catalog=catalog, source=source)


def _parse_clusters(raw: Any, problems: list[Problem], readers: list[_Reader], *,
                    optional: bool = False) -> list[ClusterConfig]:
    if raw is None and optional:
        return []
    if raw is None:
        problems.append(Problem("clusters", "no cluster is defined", "add at least one [[clusters]] table with name, endpoint and db_role"))
        return []
    if not isinstance(raw, list):
        problems.append(Problem("clusters", f"must be an array of tables, not {_kind(raw)}", "write each cluster as [[clusters]]"))
        return []
    out = []
    for i, item in enumerate(raw):
        r = _Reader(item, f"clusters[{i}]", problems)
        readers.append(r)
        out.append(_parse_cluster(r))
    return out


def parse_cluster_list(text: str, source: str) -> list[ClusterConfig]:
    """The ``[[clusters]]`` of a team catalog (same keys as in config.toml); ConfigError lists
    every problem, with ``source`` in each line."""
    problems: list[Problem] = []
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [Problem("", f"not valid TOML: {exc}", "fix the catalog's syntax at that line")]) from None
    readers: list[_Reader] = []
    clusters = _parse_clusters(doc.get("clusters", []), problems, readers)
    _check_clusters(clusters, problems)
    for r in readers:
        r.finish()
    for key in doc:
        if key != "clusters":
            problems.append(Problem(key, "unknown key in a catalog", "a catalog holds only [[clusters]] tables"))
    if problems:
        raise ConfigError(source, problems)
    return clusters


def load_config(path: str | Path) -> Config:
    """Read and validate the config file at ``path``."""
    p = Path(path).expanduser()
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(str(p), [Problem("", "file not found", "create it (see README: Configuration) or pass --config PATH")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(str(p), [Problem("", f"cannot be read: {exc}", "check the file's permissions and encoding (UTF-8)")]) from None
    return parse_config(text, str(p))
