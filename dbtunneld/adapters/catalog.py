"""The team catalog: clusters shared by a team, merged into the user's own config.

``[catalog] source`` is a TOML file of ``[[clusters]]`` (a path, relative to config.toml, or an
https URL fetched with a timeout); ``rds_tags = true`` adds every Aurora MySQL cluster tagged
``dbtunneld:role`` (its Vault role) and optionally ``dbtunneld:port`` (its local port).

Merging (``merge_catalog``): the user's own entry wins over a catalog entry of the same name; a
catalog cluster keeps the port it got the first time (persisted in the ports file), so catalog
updates applied on reload never move a port; a catalog port that another cluster already uses is
a ``ConfigError`` naming both. A catalog that cannot be fetched (network, AWS sign-in) falls back
to the last good copy (``state/catalog.toml``) with a warning; a catalog that is wrong is an error.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

from ..core.config import ClusterConfig, Config, parse_cluster_list
from ..core.errors import ConfigError, DbtunneldError, Problem, TransientError
from . import inventory
from .ports import PortBook

log = logging.getLogger(__name__)

MAX_CATALOG_BYTES = 1 << 20


def source_path(config: Config) -> Path:
    """The catalog file of a path ``source`` (relative paths are relative to config.toml)."""
    path = Path(config.catalog.source).expanduser()
    return path if path.is_absolute() else Path(config.source).expanduser().parent / path


def fetch_text(config: Config) -> str:
    """The catalog's TOML text from its file or https URL (TransientError when unreachable)."""
    source = config.catalog.source
    if source.startswith("https://"):
        return _fetch_https(source, config.catalog.timeout)
    path = source_path(config)
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(config.source, [Problem("catalog.source", f"file {str(path)!r} does not exist",
                                                  "give the path of the team's catalog TOML file")]) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TransientError(f"the catalog {path} cannot be read: {exc}") from None


def _fetch_https(url: str, timeout: float) -> str:
    request = urllib.request.Request(url, headers={"Accept": "application/toml, text/plain"})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=ssl.create_default_context()) as resp:
            body = resp.read(MAX_CATALOG_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise TransientError(f"the catalog {url} answered HTTP {exc.code}",
                             hint="check catalog.source; the last good copy stays in use") from None
    except (urllib.error.URLError, OSError) as exc:
        raise TransientError(f"the catalog {url} is unreachable: {getattr(exc, 'reason', exc)}",
                             hint="check the network; the last good copy stays in use") from None
    if len(body) > MAX_CATALOG_BYTES:
        raise TransientError(f"the catalog {url} is larger than {MAX_CATALOG_BYTES} bytes")
    return body.decode("utf-8")


def file_clusters(config: Config, cache: Path | None) -> list[ClusterConfig]:
    """The clusters of ``catalog.source``; the last good copy when it cannot be fetched now."""
    try:
        text = fetch_text(config)
        clusters = parse_cluster_list(text, f"catalog {config.catalog.source}")
    except TransientError as exc:
        if cache is None or not cache.is_file():
            log.warning("catalog: %s; no earlier copy, so no catalog cluster for now", exc.message)
            return []
        log.warning("catalog: %s; using the last good copy", exc.message)
        return parse_cluster_list(cache.read_text(encoding="utf-8"), f"catalog {cache}")
    if cache is not None:
        _write_private(cache, text)
    return clusters


def rds_tag_clusters(config: Config) -> list[ClusterConfig]:
    """Aurora MySQL clusters tagged ``dbtunneld:role``; [] (with a warning) when AWS cannot answer."""
    from .aws import AwsSession

    try:
        found = inventory.aurora_clusters(AwsSession(config.aws).client("rds"))
    except DbtunneldError as exc:
        log.warning("catalog: RDS tags unavailable (%s); tagged clusters are added at the next reload",
                    exc.one_line())
        return []
    return [ClusterConfig(name=c.identifier, endpoint=c.endpoint, port=c.port, db_role=c.tag_role,
                          local_port=c.tag_port(), database=c.database)
            for c in found if c.tag_role]


def merge_catalog(config: Config, catalog: list[ClusterConfig], book: PortBook, origin: str) -> Config:
    """``config`` with the catalog's clusters added (see the module docstring)."""
    own = {c.name for c in config.clusters}
    for c in catalog:
        if c.name in own:
            log.info('catalog: cluster "%s" is also in %s; your entry is used', c.name, config.source)
    added = [c for c in catalog if c.name not in own]
    known = book.assignments()
    placed = [_stable_port(c, known) for c in added]
    _check_ports(config, placed, known, origin)
    for c in placed:
        if c.local_port is not None and c.name not in known:
            book.keep(c.name, c.local_port)
    return replace(config, clusters=config.clusters + tuple(placed),
                   catalog_clusters=tuple(c.name for c in placed))


def _stable_port(c: ClusterConfig, known: dict[str, int]) -> ClusterConfig:
    """The port the cluster got the first time wins over what the catalog says now."""
    if c.name in known:
        if c.local_port not in (None, known[c.name]):
            log.info('catalog: cluster "%s" keeps local port %d (the catalog now says %d)',
                     c.name, known[c.name], c.local_port)
        return replace(c, local_port=known[c.name])
    return c


def _check_ports(config: Config, placed: list[ClusterConfig], known: dict[str, int], origin: str) -> None:
    users: dict[int, str] = {c.local_port: f'cluster "{c.name}" in {config.source}'
                             for c in config.clusters if c.local_port is not None}
    for c in config.clusters:
        if c.local_port is None and c.name in known:
            users.setdefault(known[c.name], f'cluster "{c.name}" in {config.source} (assigned earlier)')
    problems = []
    for c in placed:
        if c.local_port is None:
            continue
        if c.local_port in users:
            problems.append(Problem("catalog", f'catalog cluster "{c.name}" (from {origin}) wants local_port '
                                    f'{c.local_port}, already used by {users[c.local_port]}',
                                    "pin another local_port for one of them (in your config.toml, or ask "
                                    "the catalog's owner)"))
        users.setdefault(c.local_port, f'catalog cluster "{c.name}"')
    if problems:
        raise ConfigError(config.source, problems)


def with_catalog(config: Config, ports_file: Path, state_dir: Path | None = None) -> Config:
    """``config`` plus its catalog (unchanged when it has none)."""
    if not config.catalog.enabled:
        return config
    clusters: list[ClusterConfig] = []
    origins = []
    if config.catalog.source:
        clusters += file_clusters(config, state_dir / "catalog.toml" if state_dir else None)
        origins.append(config.catalog.source)
    if config.catalog.rds_tags:
        names = {c.name for c in clusters}
        clusters += [c for c in rds_tag_clusters(config) if c.name not in names]
        origins.append("RDS tags")
    return merge_catalog(config, clusters, PortBook(ports_file, config.tunnels.port_range), " and ".join(origins))


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".catalog-", suffix=".toml")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
