"""What `dbtunneld init` will write: the answers as plain data, and the local ports it proposes.

Ports are stable: a cluster already in the config keeps its port; a new one takes its team's
``dbtunneld:port`` tag when that port is free and unclaimed, else the first port of the range
that no cluster claims and no process holds.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from ...adapters.ports import port_is_free


@dataclass
class VaultPlan:
    address: str
    role: str
    iam_server_id: str = ""
    auth_mount: str = "aws"
    database_mount: str = "database"


@dataclass
class BastionPlan:
    transport: str = "ssm-ssh"
    instance_id: str = ""
    tags: dict[str, str] = field(default_factory=dict)
    user: str = "ec2-user"
    key_file: str = ""
    note: str = ""                   # how it was found (written as a comment)


@dataclass
class ClusterPlan:
    name: str
    endpoint: str
    port: int
    db_role: str
    local_port: int
    reader_endpoint: str = ""
    database: str = ""


@dataclass
class InitPlan:
    profile: str
    region: str
    vault: VaultPlan | None = None
    bastion: BastionPlan | None = None
    clusters: list[ClusterPlan] = field(default_factory=list)


class PortProposer:
    """Hands out local ports that no cluster claims and no process holds."""

    def __init__(self, port_range: tuple[int, int], claimed: Iterable[int] = (),
                 is_free: Callable[[int], bool] = port_is_free) -> None:
        self.port_range = port_range
        self.claimed = set(claimed)
        self._is_free = is_free

    def propose(self, wanted: int | None = None) -> int:
        """``wanted`` when it is unclaimed and free, else the first such port of the range."""
        if wanted is not None and wanted not in self.claimed and self._is_free(wanted):
            return self._claim(wanted)
        lo, hi = self.port_range
        for port in range(lo, hi + 1):
            if port not in self.claimed and self._is_free(port):
                return self._claim(port)
        raise ValueError(f"no free port left in [{lo}, {hi}]; widen tunnels.port_range")

    def _claim(self, port: int) -> int:
        self.claimed.add(port)
        return port
