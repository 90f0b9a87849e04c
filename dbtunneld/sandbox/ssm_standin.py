"""The SSM stand-in: StartSession & co. plus the agent side of the data channel, on loopback.

moto has no Session Manager, and no SSM agent can run here, so this stand-in plays both AWS
parts a session touches, following their wire behaviour (see ``ssm_agent`` for the agent):

* the SSM JSON 1.1 API (``X-Amz-Target: AmazonSSM.<Operation>``, SigV4 verified by
  ``ssm_sigv4``): StartSession (``AWS-StartSSHSession``,
  ``AWS-StartPortForwardingSessionToRemoteHost``), ResumeSession, TerminateSession,
  DescribeSessions, DescribeInstanceInformation (``ssm_inventory``); other operations are forwarded to ``--forward-url`` (moto) when given;
* the data-channel websockets at ``ws://HOST:PORT/v1/data-channel/<session-id>`` (the stream
  URL StartSession returns, its query holding ``/``, ``+`` and ``=`` as real ones may): the
  upgrade must be SigV4-signed for ``ssmmessages`` (Authorization header, canonical query as
  aws-sdk-go v1 builds it; or a presigned URL) and the first message must carry the session's
  current token (OpenDataChannel); each ResumeSession issues a new token;
* the service's preferences: the idle session timeout (default 20 min; only data messages
  reset it, as smux keepalive would otherwise: aws/amazon-ssm-agent ``port_mux.go``
  ``initialize``) and the max session duration; at either the service sends ``channel_closed``
  (with the reason in ``Output``) and closes the websocket, as for TerminateSession (what the
  client sees: aws/session-manager-plugin ``src/datachannel/streaming.go``
  ``HandleChannelClosedMessage`` prints ``Output`` and stops the session);
* a control API for tests and the sandbox (no auth; loopback only):
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
  VPC's resolver answers; a port session resolves its host once, like the agent);
  ``GET|POST /_standin/instances`` (the managed nodes and their PingStatus: ``ssm_inventory``).

KMS-encrypted sessions (``kms``, ``ssm_kms``: the account's Session Manager preference) and a
``stream_base`` for stream URLs behind a TLS front are set at start (``ssm_standin_cli``).

Modes: ``realistic`` (the default) paces and resends like the agent (~1 MB/s); ``fast`` is for
tests of the client's own throughput (say so in the test). The command line is in
``ssm_standin_cli`` (``--vpc-dns-seed MOTO_SEED.json``: moto's Aurora endpoint names resolve to
127.0.0.1, standing in for the VPC's DNS). In-process: ``SsmStandIn(...).start_background()``
returns once listening (``.url``); ``stop_background()`` ends every session and stops. Tokens are
never logged.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hmac
import json
import logging
import re
import secrets
import sys
import threading
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .ssm_agent import DEFAULT_AGENT_VERSION, AgentSession, Faults
from .ssm_agent_port import PortPlugin, Resolver, system_resolve
from .ssm_kms import KmsEncryption, KmsSettings
from .ssm_inventory import InventoryError, ManagedInstances
from .ssm_http import HttpRequest, HttpResponse, HttpServer, WsConnection
from .ssm_sigv4 import SignatureError, SignedBy, Verifier

log = logging.getLogger("dbtunneld.sandbox.ssm_standin")

SSH_DOCUMENT = "AWS-StartSSHSession"
REMOTE_DOCUMENT = "AWS-StartPortForwardingSessionToRemoteHost"
JSON_11 = "application/x-amz-json-1.1"
STREAM_PATH = re.compile(r"^/v1/data-channel/([A-Za-z0-9_.@-]+)$")
CONTROL_SESSION = re.compile(r"^/_standin/sessions/([A-Za-z0-9_.@-]+)/(close-websocket|terminate|pause|freeze)$")
TARGET_SYNTAX = re.compile(r"^((i|mi)-[0-9a-f]{8,17}|ecs:[^_\s]+_[^_\s]+_\S+)$")
OPEN_TIMEOUT = 10.0
ACTIVE = ("Connecting", "Connected", "Disconnected")
# The service's words are not public; these say what happened in the same spirit.
IDLE_REASON = "Session terminated: idle for {minutes} (Session Manager idle session timeout)"
MAX_DURATION_REASON = "Session terminated: it reached the maximum session duration of {minutes}"


class ApiError(Exception):
    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


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


def _minutes(seconds: float) -> str:
    return f"{seconds / 60:g} minutes" if seconds >= 60 else f"{seconds:g} seconds"


class SsmStandIn:
    """The stand-in server. Asyncio: ``await start()`` / ``await stop()``, or the *_background pair."""

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        targets: dict[str, tuple[str, int]] | None = None,
        allow_remote: list[str] | tuple[str, ...] = (),
        faults: Faults | None = None,
        agent_version: str = DEFAULT_AGENT_VERSION,
        forward_url: str | None = None,
        allow_unsigned_websocket: bool = False,
        vpc_dns_file: str | None = None,
        credentials: dict[str, str] | None = None,
        accept_unknown_keys: bool = False,
        resolve: Resolver = system_resolve,
        stream_base: str = "",
        kms: KmsSettings | None = None,
    ) -> None:
        self.host = host
        self.vpc_dns_file = vpc_dns_file
        self.stream_base = stream_base.rstrip("/")  # scheme://host[:port] of stream URLs (a TLS front)
        self.kms = kms  # the account encrypts sessions with this KMS key
        self.dns: dict[str, list[str]] = {}  # /_standin/dns answers, before ``resolve``
        self.allow_unsigned_websocket = allow_unsigned_websocket
        self.verifier = Verifier(credentials, accept_unknown_keys=accept_unknown_keys)
        # with a VPC seed, moto's Aurora endpoint names resolve to the loopback MariaDB standing in for them
        self._system_resolve = self._vpc_resolver(resolve) if vpc_dns_file else resolve
        self.resolve = self._resolve  # how agents look up remote hosts (once per session): the DNS seam
        self.port = port
        self.targets = dict(targets or {})
        self.allow_remote = list(allow_remote)
        self.faults = faults or Faults()
        self.agent_version = agent_version
        self.forward_url = forward_url
        self.sessions: dict[str, SessionRecord] = {}
        self.instances = ManagedInstances(vpc_dns_file)  # DescribeInstanceInformation's nodes
        self._server = HttpServer(self._http, self._websocket, self._authorize_websocket)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopped: asyncio.Event | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> str:
        self.port = await self._server.start(self.host, self.port)
        log.info("SSM stand-in listening on %s (targets: %s)", self.url, ", ".join(self.targets) or "none")
        return self.url

    async def stop(self) -> None:
        for record in list(self.sessions.values()):
            if record.status in ACTIVE:
                await self._end(record, "the stand-in stopped")
        await self._server.stop()

    # --- in-process use ---------------------------------------------------------------------------

    def start_background(self, timeout: float = 10.0) -> "SsmStandIn":
        ready = threading.Event()
        failure: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            self._stopped = asyncio.Event()
            try:
                loop.run_until_complete(self.start())
            except BaseException as exc:
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_until_complete(self._stopped.wait())
            loop.run_until_complete(self.stop())
            loop.close()

        self._thread = threading.Thread(target=main, name="ssm-standin", daemon=True)
        self._thread.start()
        if not ready.wait(timeout) or failure:
            raise RuntimeError(f"SSM stand-in did not start: {failure[0] if failure else 'timeout'}")
        return self

    def stop_background(self, timeout: float = 10.0) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(timeout)

    def call(self, coro: Any, timeout: float = 10.0) -> Any:
        """Run a coroutine on the background loop (tests poke sessions this way)."""
        assert self._loop is not None
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # --- HTTP dispatch ----------------------------------------------------------------------------

    async def _http(self, request: HttpRequest) -> HttpResponse:
        if request.path.startswith("/_standin/"):
            return await self._control(request)
        target = request.header("x-amz-target")
        if request.method == "POST" and target.startswith("AmazonSSM."):
            return await self._api(request, target.split(".", 1)[1])
        return HttpResponse.json({"message": f"no route for {request.method} {request.path}"}, 404)

    async def _api(self, request: HttpRequest, operation: str) -> HttpResponse:
        try:
            owner = self._check_signature(request, "ssm")
            handler = getattr(self, f"_op_{operation}", None)
            if handler is None:
                return await self._forward(request, operation)
            return HttpResponse.json(await handler(request.json(), owner), content_type=JSON_11)
        except ApiError as exc:
            return HttpResponse.json({"__type": exc.code, "message": exc.message}, exc.status, content_type=JSON_11, **{"x-amzn-ErrorType": exc.code})
        except (ValueError, KeyError, TypeError) as exc:
            return HttpResponse.json({"__type": "ValidationException", "message": str(exc)}, 400, content_type=JSON_11)

    def _check_signature(self, request: HttpRequest, service: str) -> str:
        return self._verify(request, service).access_key

    def _verify(self, request: HttpRequest, service: str) -> SignedBy:
        try:
            return self.verifier.verify(request.method, request.target, request.headers, request.body, service, now=_utcnow())
        except SignatureError as exc:
            raise ApiError(exc.code, exc.message, 403) from None

    async def _forward(self, request: HttpRequest, operation: str) -> HttpResponse:
        if not self.forward_url:
            raise ApiError("UnknownOperationException", f"the SSM stand-in does not implement {operation}")
        headers = {k: v for k, v in request.headers.items() if k not in ("host", "connection", "content-length")}
        req = urllib.request.Request(self.forward_url, data=request.body, headers=headers, method="POST")

        def call() -> HttpResponse:
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return HttpResponse(resp.status, resp.read(), {"Content-Type": resp.headers.get("Content-Type", JSON_11)})
            except urllib.error.HTTPError as exc:
                return HttpResponse(exc.code, exc.read(), {"Content-Type": exc.headers.get("Content-Type", JSON_11)})

        return await asyncio.get_running_loop().run_in_executor(None, call)

    # --- SSM operations ---------------------------------------------------------------------------

    async def _op_StartSession(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        target = str(body.get("Target") or "")
        if self._target_address(target) is None:
            raise ApiError("InvalidTarget", f"{target} is not connected to the stand-in (known: {', '.join(self.targets) or 'none'})")
        document = str(body.get("DocumentName") or "")
        plugin = self._plugin_for(target, document, body.get("Parameters") or {})
        session_id = f"{re.sub(r'[^A-Za-z0-9]', '', owner)[:32] or 'standin'}-{secrets.token_hex(9)}"
        record = SessionRecord(session_id, target, document, body.get("Parameters") or {}, owner, agent=None)  # type: ignore[arg-type]
        record.agent = AgentSession(
            session_id,
            plugin,
            self.faults,
            agent_version=self.agent_version,
            on_end=lambda reason, r=record: self._end(r, reason),
            on_state=lambda state, r=record: self._set_state(r, state),
        )
        if self.kms is not None:
            record.agent.actions.append(KmsEncryption(self.kms, session_id, target))
        self.sessions[session_id] = record
        asyncio.ensure_future(self._enforce_limits(record))
        log.info("StartSession %s: %s on %s (%s mode)", session_id, document, target, record.agent.mode)
        return self._grant(record)

    def _plugin_for(self, target: str, document: str, params: dict[str, Any]) -> PortPlugin:
        def param(name: str, default: str | None = None) -> str:
            values = params.get(name) or ([default] if default is not None else [])
            if not values:
                raise ApiError("InvalidParameters", f"parameter {name} is required by {document}")
            return str(values[0])

        if document == SSH_DOCUMENT:
            port = param("portNumber", "22")
            address = self._target_address(target)
            assert address is not None
            return PortPlugin({"portNumber": port}, *address, resolve=self.resolve)
        if document == REMOTE_DOCUMENT:
            host, port = param("host"), param("portNumber")
            address = self._vpc_address(host)
            if not self._remote_allowed(address, port):
                raise ApiError("InvalidParameters", f"the stand-in only forwards to --allow-remote hosts; {host}:{port} is not one")
            props = {"portNumber": port, "type": "LocalPortForwarding", "host": host, "localPortNumber": param("localPortNumber", "0")}
            return PortPlugin(props, host, int(port), resolve=self.resolve)
        raise ApiError("InvalidDocument", f"document {document!r} is not supported by the stand-in")

    def _target_address(self, target: str) -> tuple[str, int] | None:
        """Where SSH sessions to ``target`` go: its own ``--target`` or the ``*`` one."""
        if target in self.targets:
            return self.targets[target]
        if "*" in self.targets and TARGET_SYNTAX.match(target):
            return self.targets["*"]
        return None

    def _vpc_address(self, host: str) -> str:
        """What the agent dials for ``host``. The real agent resolves the name once per session with
        the VPC's DNS (agent/session/plugins/port/port.go), where Aurora endpoints resolve; here the
        writer and reader endpoints moto made (``--vpc-dns-seed``, read at each session as the seed
        may be rewritten by a moto restart) resolve to the loopback MariaDB standing in for them."""
        if not self.vpc_dns_file:
            return host
        try:
            clusters = json.loads(Path(self.vpc_dns_file).read_text()).get("clusters", {})
        except (OSError, ValueError):
            return host
        names = {c.get(k) for c in clusters.values() for k in ("endpoint", "reader_endpoint")}
        return "127.0.0.1" if host in names - {None, ""} else host

    def _vpc_resolver(self, fallback: Resolver) -> Resolver:
        def resolve(host: str) -> list[str]:
            address = self._vpc_address(host)
            return [address] if address != host else fallback(host)
        return resolve

    def _resolve(self, host: str) -> list[str]:
        """The VPC resolver: the ``/_standin/dns`` table first (tests flip it: Aurora failover)."""
        return list(self.dns.get(host.lower()) or self._system_resolve(host))

    def _set_dns(self, body: dict[str, Any]) -> None:
        name = str(body.get("name") or "").lower()
        addresses = [str(a) for a in body.get("addresses") or []]
        if not name:
            raise ValueError("dns: name is required")
        if addresses:
            self.dns[name] = addresses
        else:
            self.dns.pop(name, None)
        log.info("dns: %s -> %s", name, addresses or "(removed)")

    def _remote_allowed(self, host: str, port: str) -> bool:
        return host in self.allow_remote or f"{host}:{port}" in self.allow_remote

    def _grant(self, record: SessionRecord) -> dict[str, Any]:
        record.token = secrets.token_urlsafe(32)
        base = self.stream_base or f"ws://{self.host}:{self.port}"
        stream_url = f"{base}/v1/data-channel/{record.session_id}?role=publish_subscribe&cell-number={_cell_number()}"
        return {"SessionId": record.session_id, "TokenValue": record.token, "StreamUrl": stream_url}

    async def _op_ResumeSession(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        record = self._session(body)
        if record.status not in ACTIVE:
            return {"SessionId": record.session_id}  # no token: the session is over
        log.info("ResumeSession %s", record.session_id)
        return self._grant(record)

    async def _op_TerminateSession(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        record = self._session(body)
        await self._end(record, "terminated by TerminateSession")
        return {"SessionId": record.session_id}

    async def _op_DescribeSessions(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        state = body.get("State")
        if state not in ("Active", "History"):
            raise ApiError("ValidationException", "State must be Active or History")
        wanted = {f.get("key"): f.get("value") for f in body.get("Filters") or []}
        rows = []
        for record in self.sessions.values():
            if (record.status in ACTIVE) != (state == "Active"):
                continue
            if "SessionId" in wanted and record.session_id != wanted["SessionId"]:
                continue
            if "Target" in wanted and record.target != wanted["Target"]:
                continue
            row = {k: v for k, v in record.row().items() if k in ("SessionId", "Target", "Status", "StartDate", "EndDate", "DocumentName", "Owner", "Reason")}
            rows.append({k: v for k, v in row.items() if v not in (None, "")})
        return {"Sessions": rows}

    async def _op_DescribeInstanceInformation(self, body: dict[str, Any], owner: str) -> dict[str, Any]:
        try:
            return self.instances.describe(body)
        except InventoryError as exc:
            raise ApiError(exc.code, exc.message) from None

    def _session(self, body: dict[str, Any]) -> SessionRecord:
        record = self.sessions.get(str(body.get("SessionId") or ""))
        if record is None:
            raise ApiError("DoesNotExistException", f"session {body.get('SessionId')!r} does not exist")
        return record

    async def _end(self, record: SessionRecord, reason: str) -> None:
        if record.status not in ACTIVE:
            return
        record.status = "Terminated"
        record.reason = reason
        record.ended = time.time()
        record.token = ""
        log.info("session %s terminated: %s", record.session_id, reason)
        await record.agent.end(reason)

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
                await self._end(record, IDLE_REASON.format(minutes=_minutes(self.faults.idle_timeout)))
            elif self.faults.max_session_duration and now - agent.started > self.faults.max_session_duration:
                await self._end(record, MAX_DURATION_REASON.format(minutes=_minutes(self.faults.max_session_duration)))

    def _set_state(self, record: SessionRecord, state: str) -> None:
        if record.status in ACTIVE:
            record.status = state
            if state == "Connected":
                record.connections += 1

    # --- data channel websockets ------------------------------------------------------------------

    def _authorize_websocket(self, request: HttpRequest) -> HttpResponse | None:
        match = STREAM_PATH.match(request.path)
        record = self.sessions.get(match.group(1)) if match else None
        if record is None or record.status not in ACTIVE:
            return HttpResponse.json({"message": "no such active session"}, 404)
        if self.allow_unsigned_websocket and not request.header("authorization") and "X-Amz-Signature" not in request.query:
            return None
        try:
            self._verify(request, "ssmmessages")
        except ApiError as exc:
            log.warning("session %s: websocket upgrade refused: %s: %s", record.session_id, exc.code, exc.message)
            return HttpResponse.json({"__type": exc.code, "message": f"the websocket upgrade must be SigV4-signed for ssmmessages: {exc.message}"}, 403)
        return None

    async def _websocket(self, conn: WsConnection) -> None:
        match = STREAM_PATH.match(conn.request.path)
        record = self.sessions.get(match.group(1)) if match else None
        if record is None:
            await conn.close(1008, "no such session")
            return
        try:
            first = await asyncio.wait_for(conn.__anext__(), OPEN_TIMEOUT)
            opened = json.loads(first) if isinstance(first, str) else {}
        except (asyncio.TimeoutError, StopAsyncIteration, ValueError):
            opened = {}
        token = str(opened.get("TokenValue") or "")
        if not record.token or not hmac.compare_digest(token.encode(), record.token.encode()):
            log.warning("session %s: OpenDataChannel with a wrong or stale token; closing", record.session_id)
            await conn.close(1008, "invalid token")
            return
        await record.agent.serve(conn)

    # --- control API ------------------------------------------------------------------------------

    async def _control(self, request: HttpRequest) -> HttpResponse:
        path = request.path
        try:
            if path == "/_standin/health":
                return HttpResponse.json({"ok": True, "sessions": len(self.sessions)})
            if path == "/_standin/sessions" and request.method == "GET":
                return HttpResponse.json({"sessions": [r.row() for r in self.sessions.values()]})
            if path == "/_standin/faults":
                if request.method == "POST":
                    self.faults.update(request.json())
                    log.info("faults now %s", self.faults.to_dict())
                return HttpResponse.json(self.faults.to_dict())
            if path == "/_standin/dns":
                if request.method == "POST":
                    self._set_dns(request.json())
                return HttpResponse.json(self.dns)
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
        record = self.sessions.get(session_id)
        if record is None:
            return HttpResponse.json({"message": f"no session {session_id}"}, 404)
        if action == "close-websocket":
            done = await record.agent.close_websocket(str(body.get("mode") or "close"))
            return HttpResponse.json({"closed": done})
        if action == "terminate":
            await self._end(record, str(body.get("reason") or "terminated by the service"))
            return HttpResponse.json(record.row())
        if action == "freeze":
            record.agent.frozen = bool(body.get("frozen", True))
            return HttpResponse.json({"frozen": record.agent.frozen})
        seconds = None if body.get("start") is False else float(body.get("seconds") or 1.0)
        asyncio.ensure_future(record.agent.pause(seconds))
        return HttpResponse.json({"paused": True, "start_after": seconds})


# --- the sandbox stack --------------------------------------------------------------------------


def stack_service(services: Any) -> Any:
    """The stand-in as a service of the sandbox stack (``services``: the stack's
    ``stack_services.StackServices``): SSH sessions to any target reach the stack's sshd; port
    sessions may reach the stack's MariaDB ports."""
    from .procs import http_probe

    port = services.port("ssm")
    args = ["--port", str(port), "--target", f"*=127.0.0.1:{services.port('sshd')}",
            "--vpc-dns-seed", str(services.seed_file), "--accept-unknown-keys"]  # moto mints the keys
    for db in services.mariadb.values():
        args += ["--allow-remote", f"127.0.0.1:{db.port}", "--allow-remote", f"localhost:{db.port}"]
    ready = http_probe(f"http://127.0.0.1:{port}/_standin/health")
    return services.python_service("ssm-standin", "dbtunneld.sandbox.ssm_standin", args, ready, port)


def _cell_number() -> str:
    """Standard base64 with padding, as real stream URLs carry it raw: always with ``+``, ``/``, ``=``."""
    while True:
        text = base64.b64encode(secrets.token_bytes(13)).decode()
        if "+" in text and "/" in text:
            return text


def _utcnow() -> datetime.datetime:
    return datetime.datetime.now(datetime.timezone.utc)


if __name__ == "__main__":
    from .ssm_standin_cli import main

    sys.exit(main())
