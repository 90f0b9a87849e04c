"""A cluster's place in the supervisor: ``ClusterSlot`` (its unit and whether the user wants it
connected), how client tools connect to it (``connection_strings``), what a reload changes in the
slots (``ReloadPlan``, ``plan_reload``: pure, the supervisor detaches and attaches under its lock),
and what blocks a cluster's credentials and needs the user (``credential_problem``)."""

from __future__ import annotations

import shlex
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import quote

from ..core.config import Config
from ..core.errors import NeedsUserError, SignInNeededError
from ..core.model import CredentialState, CredentialStatus, TunnelStatus
from .units import TunnelUnit, UnitSpec, unit_specs

LOCALHOST = "127.0.0.1"

# ----------------------------------------------------------------------------- connection strings

def connection_strings(port: int, username: str, database: str = "", host: str = LOCALHOST) -> dict[str, str]:
    """How a client tool connects; never contains the password."""
    db = f"/{quote(database)}" if database else "/"
    mysql = ["mysql", "-h", host, "-P", str(port), "-u", username, "-p"] + ([database] if database else [])
    return {
        "mysql": " ".join(shlex.quote(a) for a in mysql),
        "url": f"mysql://{quote(username, safe='')}@{host}:{port}{db}",
        "jdbc": f"jdbc:mysql://{host}:{port}{db}?user={quote(username, safe='')}",
    }


# ----------------------------------------------------------------------------- one cluster

@dataclass
class ReloadPlan:
    """What a reload stops (detached from the tables first) and what it starts after."""

    stop: list["ClusterSlot"]
    release: list[str]
    start: list[str]
    connect: set[str]
    summary: dict[str, list[str]]
    keep: set[str]
    old_engine: Any = None


class ClusterSlot:
    """A cluster's running unit and whether the user wants it connected."""

    def __init__(self, spec: UnitSpec, tunnel: TunnelUnit) -> None:
        self.spec = spec
        self.tunnel = tunnel
        self.wanted = False

    @property
    def name(self) -> str:
        return self.spec.cluster.name

    @property
    def cred_name(self) -> str:
        """Whose DB user this tunnel uses: an Aurora reader port shares its cluster's."""
        return self.spec.cluster.reader_of or self.spec.cluster.name

    def status(self, cred: CredentialStatus | None) -> TunnelStatus:
        st = self.tunnel.status()
        username = cred.identity if cred and cred.state not in (CredentialState.IDLE, CredentialState.REVOKED) else ""
        return replace(st, production=self.spec.cluster.production, autoconnect=self.spec.cluster.autoconnect,
                       database=self.spec.cluster.database, credential=cred, username=st.username or username,
                       login=self.spec.cluster.login)


def plan_reload(slots: dict[str, "ClusterSlot"], new: Config, restart: bool) -> ReloadPlan:
    """What a reload to ``new`` stops, releases, starts and connects (pure: the caller detaches).
    ``restart``: the engine spec changed, so every unit restarts."""
    desired, running = unit_specs(new), dict(slots)
    kept = [] if restart else [n for n in running if n in desired and desired[n] == running[n].spec]
    gone = [n for n in running if n not in kept]
    wanted = {n for n, slot in running.items() if slot.wanted}
    release = [] if restart else [n for n in gone if n in wanted and not running[n].spec.cluster.reader_of]
    return ReloadPlan(stop=[running[n] for n in gone], release=release,
                      start=[n for n in desired if n not in kept],
                      connect={n for n in desired if n not in kept and (
                          n in wanted or (n not in running and desired[n].cluster.autoconnect))},
                      summary={"kept": kept, "stopped": [n for n in gone if n not in desired],
                               "restarted": [n for n in gone if n in desired],
                               "started": [n for n in desired if n not in running]},
                      keep=set(desired))


# ----------------------------------------------------------------------------- what blocks credentials

def credential_problem(statuses: tuple[Any, Any, dict[str, CredentialStatus]], name: str) -> Exception | None:
    """What blocks a cluster's credentials and needs the user (sign in, fix something); None otherwise."""
    aws, vault, dbs = statuses
    for st in (aws, vault, dbs.get(name)):
        if st is None:
            continue
        error = _without_hint(st.last_error)
        if st.state == CredentialState.NEEDS_SIGN_IN:
            return SignInNeededError(error or f"{st.kind} {st.name}: sign-in needed")
        if st.state == CredentialState.FAILED:
            return NeedsUserError(f"{st.kind} {st.name}: {error or 'failed'}",
                                  "run `dbtunneld doctor` to find the broken layer")
    return None


def _without_hint(text: str) -> str:
    """An error line without its trailing "(hint: ...)" (the error we raise carries its own hint)."""
    head, sep, _ = (text or "").partition(" (hint: ")
    return head if sep else (text or "")

