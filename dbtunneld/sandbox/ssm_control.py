"""The SSM stand-in's control API for tests and the sandbox (no auth; loopback only):

``GET /_standin/health``; ``GET /_standin/sessions`` (the session table: status
Connecting / Connected / Disconnected / Terminated, with stats); ``GET|POST /_standin/faults``
(JSON, see ``ssm_agent.Faults``: ``mode``, ``idle_timeout``, ``max_session_duration``,
``drop``, ``delay_ms``, ``jitter_ms``, ``close_after_messages``, ``agent_payload``, ``seed``);
``POST /_standin/sessions/<id>/close-websocket`` (``{"mode": "close"|"abort"}``);
``POST /_standin/sessions/<id>/terminate`` (``{"reason": "..."}``: a service-side end);
``POST /_standin/sessions/<id>/pause`` (``{"seconds": 1}``: pause_publication, then
start_publication; ``{"start": false}``: a pause with no start after it, as the service may);
``POST /_standin/sessions/<id>/freeze`` (``{"frozen": true|false}``: the path goes silent both
ways while the websocket stays open, as when a network path black-holes);
``GET|POST /_standin/dns`` (``{"name": "db.example", "addresses": ["127.0.0.2"]}``: what the
VPC's resolver answers, ``ssm_vpc_dns``; a port session resolves its host once, like the agent);
``GET|POST /_standin/instances`` (the managed nodes and their PingStatus: ``ssm_inventory``).
"""

from __future__ import annotations

import asyncio
import logging
import re
from typing import Any

from .ssm_agent import Faults
from .ssm_http import HttpRequest, HttpResponse
from .ssm_inventory import ManagedInstances
from .ssm_sessions import SessionTable
from .ssm_vpc_dns import VpcDns

log = logging.getLogger("dbtunneld.sandbox.ssm_standin")      # one logger for the whole stand-in

CONTROL_SESSION = re.compile(r"^/_standin/sessions/([A-Za-z0-9_.@-]+)/(close-websocket|terminate|pause|freeze)$")


class ControlApi:
    """Answers ``/_standin/*`` from the stand-in's session table, faults, DNS table and nodes."""

    def __init__(self, table: SessionTable, faults: Faults, dns: VpcDns, instances: ManagedInstances) -> None:
        self.table = table
        self.faults = faults
        self.dns = dns
        self.instances = instances

    async def handle(self, request: HttpRequest) -> HttpResponse:
        path = request.path
        sessions = self.table.sessions
        try:
            if path == "/_standin/health":
                return HttpResponse.json({"ok": True, "sessions": len(sessions)})
            if path == "/_standin/sessions" and request.method == "GET":
                return HttpResponse.json({"sessions": [r.row() for r in sessions.values()]})
            if path == "/_standin/faults":
                if request.method == "POST":
                    self.faults.update(request.json())
                    log.info("faults now %s", self.faults.to_dict())
                return HttpResponse.json(self.faults.to_dict())
            if path == "/_standin/dns":
                if request.method == "POST":
                    self.dns.set(request.json())
                return HttpResponse.json(self.dns.table)
            if path == "/_standin/instances":
                body = request.json() if request.method == "POST" else None
                return HttpResponse.json(self.instances.set_status(body) if body is not None else self.instances.listing())
            match = CONTROL_SESSION.match(path)
            if match and request.method == "POST":
                return await self._session_action(match.group(1), match.group(2), request.json())
        except (ValueError, TypeError) as exc:
            return HttpResponse.json({"message": str(exc)}, 400)
        return HttpResponse.json({"message": f"no control route {request.method} {path}"}, 404)

    async def _session_action(self, session_id: str, action: str, body: dict[str, Any]) -> HttpResponse:
        record = self.table.sessions.get(session_id)
        if record is None:
            return HttpResponse.json({"message": f"no session {session_id}"}, 404)
        if action == "close-websocket":
            done = await record.agent.close_websocket(str(body.get("mode") or "close"))
            return HttpResponse.json({"closed": done})
        if action == "terminate":
            await self.table.end(record, str(body.get("reason") or "terminated by the service"))
            return HttpResponse.json(record.row())
        if action == "freeze":
            record.agent.frozen = bool(body.get("frozen", True))
            return HttpResponse.json({"frozen": record.agent.frozen})
        seconds = None if body.get("start") is False else float(body.get("seconds") or 1.0)
        asyncio.ensure_future(record.agent.pause(seconds))
        return HttpResponse.json({"paused": True, "start_after": seconds})
