"""One parser per config.toml section ([aws], [vault], [bastion], [tunnels], [catalog], [[clusters]]).

Each takes the section's ``TableReader`` and returns its value type from ``config_schema``; the checks
that span sections (duplicate names and ports, the document's keys) live in ``dbtunneld.core.config``.
"""

from __future__ import annotations

import ipaddress
import re
import shutil
import sys
from pathlib import Path
from urllib.parse import urlsplit

from .config_reader import TableReader
from .config_schema import (AwsConfig, BastionConfig, CatalogSettings, ClusterConfig, TunnelSettings, VaultConfig,
                            aurora_reader_endpoint)

TRANSPORTS = ("ssm-ssh", "ssm-port-forward", "ssh", "plugin")
SSH_CLIENTS = ("auto", "paramiko", "openssh")     # bastion.client: who speaks SSH for transport "ssh"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
INSTANCE_RE = re.compile(r"^(i-[0-9a-f]{8,17}|mi-[0-9a-f]{8,17}|ecs:[A-Za-z0-9_-]+_[A-Za-z0-9]+_[A-Za-z0-9-]+)$")
REGION_RE = re.compile(r"[a-z]{2}(-[a-z]+)+-\d")
AWS_ENDPOINT_SERVICES = ("sts", "ec2", "rds", "ssm", "kms", "sso", "sso-oidc", "ec2-instance-connect")


def parse_aws(r: TableReader) -> AwsConfig:
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


def parse_vault(r: TableReader) -> VaultConfig:
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


def _ssh_client(r: TableReader, ec2_instance_connect: bool) -> str:
    """The SSH engine of transport "ssh". "auto" (the default) stays "auto" where OpenSSH can run
    (its ssh on PATH, not Windows, a key on disk or in the agent rather than EC2 Instance Connect's
    in-memory one): the engine is then chosen at each connect by the round trip to the bastion
    (``adapters.ssh_auto``); elsewhere it is "paramiko"."""
    client = r.text("client", "auto")
    if client not in SSH_CLIENTS:
        r.problem("client", f"unknown SSH client {client!r}", f"use one of {', '.join(SSH_CLIENTS)}")
        return "paramiko"
    if client == "auto":
        return "auto" if not ec2_instance_connect and openssh_usable() else "paramiko"
    if client == "openssh" and ec2_instance_connect:
        r.problem("client", '"openssh" cannot log in with the EC2 Instance Connect key (it exists only in memory)',
                  'set client = "paramiko" (or "auto"), or turn ec2_instance_connect off and use your own key')
    elif client == "openssh" and not openssh_usable():
        r.problem("client", '"openssh" needs OpenSSH\'s ssh on PATH with connection sharing (ControlMaster; '
                  'not OpenSSH for Windows)', 'install the OpenSSH client, or set client = "paramiko" (or "auto")')
    return client


def openssh_usable() -> bool:
    """OpenSSH's ``ssh`` with connection sharing is on PATH (not OpenSSH for Windows, which has none)."""
    return not sys.platform.startswith("win") and shutil.which("ssh") is not None


def _sts_region(r: TableReader) -> str:
    region = r.text("sts_region", "us-east-1")
    if region != "auto" and not REGION_RE.fullmatch(region):
        r.problem("sts_region", f"{region!r} is not an AWS region",
                  'write the region Vault\'s aws auth signs STS for (its sts_region), e.g. "eu-west-1", '
                  'or "auto" for the AWS profile\'s region')
    return region


def _sts_endpoint(r: TableReader) -> str:
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


def _namespace(r: TableReader) -> str:
    namespace = r.text("namespace").strip("/")
    if namespace and not all(NAME_RE.match(part) for part in namespace.split("/")):
        r.problem("namespace", f"{namespace!r} is not a Vault namespace path",
                  'write e.g. "admin" (HCP Vault) or "team-a/dev": names of letters, digits, "-", "_" and "."')
    return namespace


def parse_bastion(r: TableReader) -> BastionConfig:
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


def parse_tunnels(r: TableReader) -> TunnelSettings:
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


def parse_catalog(r: TableReader) -> CatalogSettings:
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


def parse_cluster(r: TableReader) -> ClusterConfig:
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
    reader_port, reader_endpoint = parse_reader(r, endpoint)
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
        login=parse_login(r),
        local_user=parse_local_user(r),
        local_tls=r.get("local_tls", bool, False),
        upstream_tls=parse_upstream_tls(r),
    )
    return cluster


def parse_login(r: TableReader) -> str:
    login = r.text("login", "local")
    if login not in LOGINS:
        r.problem("login", f"unknown login {login!r}",
                  'use "local" (a stable local user and password; saved logins keep working) or "lease" '
                  "(log in with the leased Vault user, which changes at each rotation)")
        return "local"
    return login


UPSTREAM_TLS = ("off", "auto", "required")


def parse_upstream_tls(r: TableReader) -> str:
    mode = r.text("upstream_tls", "off")
    if mode not in UPSTREAM_TLS:
        r.problem("upstream_tls", f"unknown mode {mode!r}",
                  'use "off" (the tunnel already encrypts the path), "auto" (TLS when the server offers it) '
                  'or "required" (refuse a server without TLS)')
        return "off"
    return mode


def parse_local_user(r: TableReader) -> str:
    user = r.text("local_user")
    if user and (len(user) > 32 or not LOCAL_USER_RE.match(user)):
        r.problem("local_user", f"{user!r} is not a usable MySQL user name",
                  "use up to 32 letters, digits, '.', '_' or '-', e.g. local_user = \"me\"")
        return ""
    return user


def parse_reader(r: TableReader, endpoint: str) -> tuple[int | None, str]:
    reader_port = r.port("reader_port", None)
    if reader_port is not None and reader_port < 1024:
        r.problem("reader_port", f"port {reader_port} is privileged", "pick a port from 1024 to 65535, e.g. 13307")
        reader_port = None
    reader_endpoint = r.text("reader_endpoint") or aurora_reader_endpoint(endpoint)
    if reader_port is not None and not reader_endpoint:
        r.problem("reader_endpoint", "is needed with reader_port (the endpoint is not an Aurora cluster endpoint)",
                  'write e.g. reader_endpoint = "orders.cluster-ro-abc.eu-west-1.rds.amazonaws.com"')
    return reader_port, reader_endpoint
