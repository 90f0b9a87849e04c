"""The SSM stand-in's session table: a record per session (its agent, its current token, its status
Connecting / Connected / Disconnected / Terminated, its stats), the grant StartSession and
ResumeSession answer (a new token and the stream URL), the rows DescribeSessions lists, and the
end of a session, by the client, by the control API or by the service's preferences: the idle
session timeout (default 20 min; only data messages reset it, as smux keepalive would otherwise:
aws/amazon-ssm-agent ``port_mux.go`` ``initialize``) and the max session duration; at either the
service sends ``channel_closed`` (with the reason in ``Output``) and closes the websocket, as for
TerminateSession (what the client sees: aws/session-manager-plugin
``src/datachannel/streaming.go`` ``HandleChannelClosedMessage`` prints ``Output`` and stops the
session). Tokens are never logged."""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from .ssm_agent import AgentSession, Faults

log = logging.getLogger("dbtunneld.sandbox.ssm_standin")      # one logger for the whole stand-in

ACTIVE = ("Connecting", "Connected", "Disconnected")
# The service's words are not public; these say what happened in the same spirit.
IDLE_REASON = "Session terminated: idle for {minutes} (Session Manager idle session timeout)"
MAX_DURATION_REASON = "Session terminated: it reached the maximum session duration of {minutes}"
DESCRIBED = ("SessionId", "Target", "Status", "StartDate", "EndDate", "DocumentName", "Owner", "Reason")


@dataclass
class SessionRecord:
    session_id: str
    target: str
    document: str
    parameters: dict[str, list[str]]
    owner: str
    agent: AgentSession
    token: str = field(repr=False, default="")
    status: str = "Connecting"
    reason: str = ""
    started: float = field(default_factory=time.time)
    ended: float | None = None
    connections: int = 0

    def row(self) -> dict[str, Any]:
        return {
            "SessionId": self.session_id,
            "Target": self.target,
            "DocumentName": self.document,
            "Status": self.status,
            "Owner": self.owner,
            "StartDate": self.started,
            "EndDate": self.ended,
            "Reason": self.reason,
            "Connections": self.connections,
            "ClientVersion": self.agent.client_version,
            "Stats": dict(self.agent.stats),
        }


class SessionTable:
    """The sessions by id (``sessions``, the stand-in's own table) and the service's rules for them
    (``faults``: the idle timeout and the max session duration, changed at run time)."""

    def __init__(self, faults: Faults) -> None:
        self.sessions: dict[str, SessionRecord] = {}
        self.faults = faults

    def add(self, record: SessionRecord) -> None:
        """A new session, held to the service's limits from now on."""
        self.sessions[record.session_id] = record
        asyncio.ensure_future(self._enforce_limits(record))

    def grant(self, record: SessionRecord, base: str) -> dict[str, Any]:
        """A new token for the session and its stream URL under ``base`` (``ws://host:port``)."""
        record.token = secrets.token_urlsafe(32)
        stream_url = f"{base}/v1/data-channel/{record.session_id}?role=publish_subscribe&cell-number={_cell_number()}"
        return {"SessionId": record.session_id, "TokenValue": record.token, "StreamUrl": stream_url}

    def describe(self, state: str, wanted: dict[str, Any]) -> list[dict[str, Any]]:
        """DescribeSessions' rows: the ``Active`` or ``History`` sessions matching the filters."""
        rows = []
        for record in self.sessions.values():
            if (record.status in ACTIVE) != (state == "Active"):
                continue
            if "SessionId" in wanted and record.session_id != wanted["SessionId"]:
                continue
            if "Target" in wanted and record.target != wanted["Target"]:
                continue
            row = {k: v for k, v in record.row().items() if k in DESCRIBED}
            rows.append({k: v for k, v in row.items() if v not in (None, "")})
        return rows

    async def end(self, record: SessionRecord, reason: str) -> None:
        if record.status not in ACTIVE:
            return
        record.status = "Terminated"
        record.reason = reason
        record.ended = time.time()
        record.token = ""
        log.info("session %s terminated: %s", record.session_id, reason)
        await record.agent.end(reason)

    async def end_all(self, reason: str) -> None:
        for record in list(self.sessions.values()):
            if record.status in ACTIVE:
                await self.end(record, reason)

    def set_state(self, record: SessionRecord, state: str) -> None:
        if record.status in ACTIVE:
            record.status = state
            if state == "Connected":
                record.connections += 1

    async def _enforce_limits(self, record: SessionRecord) -> None:
        """The service's idle timeout (data messages only: acks and pings do not count) and max duration."""
        agent = record.agent
        while record.status in ACTIVE:
            idle, longest = self.faults.idle_timeout, self.faults.max_session_duration
            await asyncio.sleep(min(1.0, idle / 10, longest / 10 if longest else 1.0))
            now = time.monotonic()
            if record.status not in ACTIVE:
                return
            if now - agent.last_data > self.faults.idle_timeout:
                await self.end(record, IDLE_REASON.format(minutes=_minutes(self.faults.idle_timeout)))
            elif self.faults.max_session_duration and now - agent.started > self.faults.max_session_duration:
                await self.end(record, MAX_DURATION_REASON.format(minutes=_minutes(self.faults.max_session_duration)))


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} minutes" if seconds >= 60 else f"{seconds:g} seconds"


def _cell_number() -> str:
    """Standard base64 with padding, as real stream URLs carry it raw: always with ``+``, ``/``, ``=``."""
    while True:
        text = base64.b64encode(secrets.token_bytes(13)).decode()
        if "+" in text and "/" in text:
            return text
