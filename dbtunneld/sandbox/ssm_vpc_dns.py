"""What the SSM stand-in's agent resolves host names to, standing in for the VPC's DNS: the table
tests set through ``/_standin/dns`` (``{"name": "db.example", "addresses": ["127.0.0.2"]}``: an
Aurora failover flips it) first, then the Aurora endpoint names moto made (``--vpc-dns-seed``),
which resolve to the loopback MariaDB standing in for them, then the system resolver. A port
session resolves its host once, like the agent."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .ssm_agent_port import Resolver

log = logging.getLogger("dbtunneld.sandbox.ssm_standin")      # one logger for the whole stand-in


class VpcDns:
    """The resolver agents use (``resolve``) and the table behind it (``table``: name -> addresses)."""

    def __init__(self, seed_file: str | None, fallback: Resolver) -> None:
        self.seed_file = seed_file
        self.table: dict[str, list[str]] = {}  # /_standin/dns answers, before ``fallback``
        # with a VPC seed, moto's Aurora endpoint names resolve to the loopback MariaDB standing in for them
        self._system_resolve = self._seeded(fallback) if seed_file else fallback

    def address(self, host: str) -> str:
        """What the agent dials for ``host``. The real agent resolves the name once per session with
        the VPC's DNS (agent/session/plugins/port/port.go), where Aurora endpoints resolve; here the
        writer and reader endpoints moto made (``--vpc-dns-seed``, read at each session as the seed
        may be rewritten by a moto restart) resolve to the loopback MariaDB standing in for them."""
        if not self.seed_file:
            return host
        try:
            clusters = json.loads(Path(self.seed_file).read_text()).get("clusters", {})
        except (OSError, ValueError):
            return host
        names = {c.get(k) for c in clusters.values() for k in ("endpoint", "reader_endpoint")}
        return "127.0.0.1" if host in names - {None, ""} else host

    def _seeded(self, fallback: Resolver) -> Resolver:
        def resolve(host: str) -> list[str]:
            address = self.address(host)
            return [address] if address != host else fallback(host)
        return resolve

    def resolve(self, host: str) -> list[str]:
        """The VPC resolver: the ``/_standin/dns`` table first (tests flip it: Aurora failover)."""
        return list(self.table.get(host.lower()) or self._system_resolve(host))

    def set(self, body: dict[str, Any]) -> None:
        """A ``/_standin/dns`` POST: ``name`` resolves to ``addresses`` (none: removed)."""
        name = str(body.get("name") or "").lower()
        addresses = [str(a) for a in body.get("addresses") or []]
        if not name:
            raise ValueError("dns: name is required")
        if addresses:
            self.table[name] = addresses
        else:
            self.table.pop(name, None)
        log.info("dns: %s -> %s", name, addresses or "(removed)")
