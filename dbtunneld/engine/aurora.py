"""Aurora writer and reader ports: which role the server behind a tunnel plays, and failover.

A cluster with ``reader_port`` gets a second unit to its reader endpoint (``reader_unit``). The
login probe (``login_probe.probe_mysql_login``) reads the server's read-only flags
(``read_only_flags``): Aurora replicas report ``@@innodb_read_only = 1``; MariaDB and MySQL
servers that lack that variable, or keep it off, are read-only when ``@@read_only`` is on (that
is how the sandbox flips its MariaDB, with ``SET GLOBAL read_only=1``). ``RoleCheckedTunnel``
keeps what the server said for the status, and when a writer port answers read-only (a failover:
the writer endpoint's DNS moved, while an SSM port session keeps the old address) it rebuilds the
tunnel once and logs it; the tray's notifier announces the incident once (``notify``).
"""

from __future__ import annotations

import logging
from dataclasses import replace
from typing import Any

from ..core.config import ClusterConfig
from ..core.model import TunnelState, TunnelStatus

log = logging.getLogger(__name__)

WRITER, READER = "writer", "reader"
READER_SUFFIX = "-reader"


def reader_unit(cluster: ClusterConfig) -> ClusterConfig:
    """The unit serving ``cluster``'s reader_port: same role and user settings, reader endpoint."""
    return replace(cluster, name=f"{cluster.name}{READER_SUFFIX}", endpoint=cluster.reader_endpoint,
                   local_port=cluster.reader_port, reader_port=None, reader_of=cluster.name)


def expected_role(cluster: ClusterConfig) -> str:
    return READER if cluster.reader_of else WRITER


def read_only_flags(conn: Any) -> bool:
    """Whether the server of the open PyMySQL connection ``conn`` refuses writes."""
    with conn.cursor() as cur:
        cur.execute("SHOW GLOBAL VARIABLES WHERE Variable_name IN ('innodb_read_only', 'read_only')")
        flags = {str(name).lower(): str(value).upper() for name, value in cur.fetchall()}
    return flags.get("innodb_read_only") in ("ON", "1") or flags.get("read_only") in ("ON", "1")


class RoleCheckedTunnel:
    """A tunnel unit plus the role its server last reported; rebuilds once after a failover."""

    def __init__(self, tunnel: Any, expected: str) -> None:
        self.tunnel = tunnel
        self.expected = expected
        self.role = ""
        self._rebuilt = False

    def observe(self, read_only: bool) -> None:
        """Called by the probe with what the server said."""
        self.role = READER if read_only else WRITER
        if self.expected != WRITER or not read_only:
            self._rebuilt = False
            return
        if not self._rebuilt:
            self._rebuilt = True
            log.warning("[tunnel=%s] the writer endpoint answers read-only (an Aurora failover?): "
                        "rebuilding the tunnel to reach the new writer", self.tunnel.name)
            self.tunnel.reconnect()

    def status(self) -> TunnelStatus:
        st: TunnelStatus = self.tunnel.status()
        return replace(st, role=self.role if st.state == TunnelState.UP else "", expected_role=self.expected)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tunnel, name)
