"""Loading config.toml (and a team catalog's cluster list): the whole-document checks and the error
messages. TOML -> the frozen value types of ``config_schema``, validated as a whole.

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
import tomllib
from pathlib import Path
from typing import Any, Callable

from .config_reader import TableReader, kind_of, section_reader
from .config_schema import (AwsConfig, BastionConfig, CatalogSettings, ClusterConfig, Config, CredentialSettings,
                            TunnelSettings, UiSettings, VaultConfig)
from .config_sections import (parse_aws, parse_bastion, parse_catalog, parse_cluster, parse_tunnels,
                              parse_vault)
from .errors import ConfigError, Problem

# The value types stay importable from here: most of the package reads them as ``config.ClusterConfig``.
__all__ = ["AwsConfig", "BastionConfig", "CatalogSettings", "ClusterConfig", "Config", "CredentialSettings",
           "TunnelSettings", "UiSettings", "VaultConfig", "load_config", "parse_cluster_list", "parse_config"]


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
    readers: list[TableReader] = []

    def section(name: str, parse: Callable[[TableReader], Any]) -> Any:
        r = section_reader(doc, name, problems)
        readers.append(r)
        return parse(r)

    aws = section("aws", parse_aws)
    vault = section("vault", parse_vault) if "vault" in doc else None
    if vault is None:
        problems.append(Problem("vault", "section is missing", "add [vault] with address and role"))
    bastion = section("bastion", parse_bastion)
    creds = section("credentials", lambda r: CredentialSettings(
        mint_ahead=r.number("mint_ahead", 600.0, 0.0, 86400.0),
        revoke_timeout=r.number("revoke_timeout", 10.0, 0.5, 120.0)))
    tunnels = section("tunnels", parse_tunnels)
    ui = section("ui", lambda r: UiSettings(
        clipboard_clear_seconds=r.number("clipboard_clear_seconds", 30.0, 0.0, 3600.0),
        notifications=r.get("notifications", bool, True)))
    catalog = section("catalog", parse_catalog)
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
    if problems or vault is None:     # no vault is one of the problems
        raise ConfigError(source, problems)
    return Config(vault=vault, clusters=tuple(clusters), aws=aws, bastion=bastion,
                  credentials=creds, tunnels=tunnels, ui=ui, catalog=catalog, source=source)


def _parse_clusters(raw: Any, problems: list[Problem], readers: list[TableReader], *,
                    optional: bool = False) -> list[ClusterConfig]:
    if raw is None and optional:
        return []
    if raw is None:
        problems.append(Problem("clusters", "no cluster is defined", "add at least one [[clusters]] table with name, endpoint and db_role"))
        return []
    if not isinstance(raw, list):
        problems.append(Problem("clusters", f"must be an array of tables, not {kind_of(raw)}", "write each cluster as [[clusters]]"))
        return []
    out = []
    for i, item in enumerate(raw):
        r = TableReader(item, f"clusters[{i}]", problems)
        readers.append(r)
        out.append(parse_cluster(r))
    return out


def parse_cluster_list(text: str, source: str) -> list[ClusterConfig]:
    """The ``[[clusters]]`` of a team catalog (same keys as in config.toml); ConfigError lists
    every problem, with ``source`` in each line."""
    problems: list[Problem] = []
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(source, [Problem("", f"not valid TOML: {exc}", "fix the catalog's syntax at that line")]) from None
    readers: list[TableReader] = []
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
